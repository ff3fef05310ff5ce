"""`python -m pocketlm`: the CLI where no console script is installed (a bare GPU machine's image)."""
from .cli import main

main()
