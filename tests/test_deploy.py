"""The deployment files, checked with what runs here (no Docker engine runs on these machines)."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_image_builds_and_serves_the_dashboard():
    """The image once held the binaries only, so a compose deployment served a dashboard that never
    hydrated: the builder stage must build the browser half and the collector serve it."""
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^\s*&& ui/build.sh --release", dockerfile, re.M), "the builder stage builds the dashboard's wasm"
    assert "COPY --from=builder /out/site /usr/share/switchyard/site" in dockerfile
    assert re.search(r"^ENV COLLECTOR_UI_DIR=/usr/share/switchyard/site$", dockerfile, re.M), "the collector serves them from the image"
