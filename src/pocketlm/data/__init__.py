"""Small files shipped with pocketlm (see python-faq/README.md for their origin and licence)."""
from pathlib import Path

DATA_DIR = Path(__file__).parent
SAMPLE_DOCS = DATA_DIR / "python-faq"
