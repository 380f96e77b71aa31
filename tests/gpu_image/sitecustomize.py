"""The GPU machines' image, as far as imports go: put this folder on PYTHONPATH and the packages that image lacks
(Gradio, Plotly, corrupt-tta, spaces, the browser and Ray) cannot be imported, as there. A GPU session's suite
(``python -m imse perf --suite``) must run without them; tests/test_perf_suite.py checks that it does."""

import sys

ABSENT = {"gradio", "gradio_client", "plotly", "corrupt_tta", "spaces", "playwright", "ray"}


class _Absent:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ABSENT:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


sys.meta_path.insert(0, _Absent())
