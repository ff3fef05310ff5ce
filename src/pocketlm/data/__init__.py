"""Small files shipped with pocketlm (each folder's README gives their origin and licence)."""
from pathlib import Path

DATA_DIR = Path(__file__).parent
SAMPLE_DOCS = DATA_DIR / "python-faq"
GENERAL_TEXT = DATA_DIR / "general"  # what a student is distilled on when nothing else is named


def general_text() -> list[str]:
    return [str(p) for p in sorted(GENERAL_TEXT.glob("*.txt"))]
