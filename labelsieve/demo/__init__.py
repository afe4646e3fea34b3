"""`labelsieve demo`: audit a bundled EuroSAT sample fully offline with the bundled mini CLIP.

The sample: 300 EuroSAT RGB tiles (MIT licence), 30 per class, 45 of whose labels (15 %) were
flipped at random (``data/truth.csv`` has the originals; ``examples/make_demo_data.py`` rebuilds it).
The model: "EffLite0-MiniLM-CLIP" (``mini-clip/PROVENANCE.md``), a 20 M-parameter stand-in that
loads without the Hugging Face hub. Its text side knows little about satellite images, which is why
the demo's detector is one that learns from the image features; real audits should use real CLIP.
"""

from __future__ import annotations

from pathlib import Path

from labelsieve.api import audit
from labelsieve.audit.evaluate import evaluate_audit, format_metrics
from labelsieve.core.progress import console, escape

DEMO_DIR = Path(__file__).resolve().parent
DATA_DIR = DEMO_DIR / "data"
MODEL_DIR = DEMO_DIR / "mini-clip"
DEMO_METHOD = "confident_learning"


def run_demo(out_dir: str | Path = "labelsieve-demo", *, method: str | None = None, progress: bool = True,
             cache_dir: str | Path | None = None):
    """Run the demo audit and score it against the known true labels; returns the Audit."""
    out = Path(out_dir)
    a = audit(DATA_DIR, DATA_DIR / "labels.csv", method=method or DEMO_METHOD, model=str(MODEL_DIR),
              pretrained=None, out_dir=out, classnames=DATA_DIR / "classnames.csv", progress=progress,
              cache_dir=cache_dir)
    metrics = evaluate_audit(out / "audit.csv", DATA_DIR / "truth.csv")
    console.print("\n[bold]Against the 45 labels we flipped on purpose[/bold] (data/truth.csv):")
    console.print(format_metrics(metrics))
    console.print(
        "\n[yellow]This demo uses a small offline stand-in model (mini CLIP). For real audits use real CLIP, "
        "e.g. `labelsieve audit IMAGES labels.csv` (ViT-B-16 / openai, downloaded by open_clip).[/yellow]\n"
        f"Open {escape(str(out / 'audit.csv'))} in a spreadsheet (worst first), or {escape(str(out / 'audit.html'))} "
        "in a browser."
    )
    return a
