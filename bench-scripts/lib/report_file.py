"""Writing a results/*.json report: whole or not at all."""

import json
import os


def write(path, report):
    """Writes `report` as indented JSON to `path` through a temporary file,
    so a reader (or a crash) never sees half a report."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)
