"""pocketlm: make a language model pocket-sized and run it on your own machine."""
__version__ = "0.1.0"
