"""Fetch transformers' own common model tests (docs/design.md#testing) for the installed transformers version.

The transformers **sdist** ships `tests/test_modeling_common.py` (ModelTesterMixin) and
`tests/test_configuration_common.py` (ConfigTester), but not the modules they import from `tests/exporters`,
`tests/generation` and `tests/utils`. This script downloads the sdist that matches the installed version exactly,
extracts only its `tests/` folder into a cache and adds one-line stubs for those three imports. Nothing from
transformers is ever committed to this repository.

    python tests/hf_conformance/fetch_transformers_tests.py        # prints the tests directory

Cache: `$MEMFORMER_HF_TESTS_DIR/transformers-tests-<version>/tests` (default root `~/.cache/memformer_hf`).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

# Stubs for the modules `test_modeling_common.py` / `test_configuration_common.py` import but the sdist lacks.
# `config_common_kwargs`: a non-default value for each of the 9 public attributes of a bare v5 `PreTrainedConfig`.
STUBS = {
    "__init__.py": "",
    "exporters/__init__.py": "",
    "exporters/test_export.py": "class ExportTesterMixin:  # stub: the sdist lacks tests/exporters\n    pass\n",
    "generation/__init__.py": "",
    "generation/test_utils.py": "class GenerationTesterMixin:  # stub: the sdist lacks tests/generation\n    pass\n",
    "utils/__init__.py": "",
    "utils/test_configuration_utils.py": (
        "config_common_kwargs = {'return_dict': False, 'output_hidden_states': True, 'output_attentions': True, "
        "'dtype': 'float16', 'chunk_size_feed_forward': 5, 'architectures': ['BertModel'], "
        "'id2label': {0: 'label'}, 'label2id': {'label': '0'}, 'problem_type': 'regression'}\n"
    ),
}
REQUIRED = ("test_modeling_common.py", "test_configuration_common.py")


def installed_transformers_version() -> str:
    from importlib.metadata import version

    return version("transformers")


def tests_dir(version: str | None = None) -> Path:
    """Where the extracted `tests/` package of transformers `version` (default: the installed one) lives."""
    root = Path(os.environ.get("MEMFORMER_HF_TESTS_DIR") or Path.home() / ".cache" / "memformer_hf")
    return root / f"transformers-tests-{version or installed_transformers_version()}" / "tests"


def is_complete(path: Path) -> bool:
    return all((path / name).is_file() for name in (*REQUIRED, *STUBS))


def fetch(version: str | None = None, force: bool = False) -> Path:
    """Download the transformers `version` sdist, extract its `tests/` folder and add the stubs; returns the folder."""
    version = version or installed_transformers_version()
    target = tests_dir(version)
    if is_complete(target) and not force:
        return target
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-binary", ":all:", "--no-deps",
                        f"transformers=={version}", "--dest", tmp], check=True)
        archives = list(Path(tmp).glob("transformers-*.tar.gz"))
        if len(archives) != 1:
            raise RuntimeError(f"expected one transformers sdist in {tmp}, found {archives}")
        prefix = f"transformers-{version}/tests/"
        staging = Path(tmp) / "extracted"
        with tarfile.open(archives[0]) as tar:
            members = [m for m in tar.getmembers() if m.name.startswith(prefix) and (m.isfile() or m.isdir())]
            for m in members:
                m.name = m.name[len(prefix):] or "."
            kwargs = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
            tar.extractall(staging, members=members, **kwargs)
        missing = [name for name in REQUIRED if not (staging / name).is_file()]
        if missing:
            raise RuntimeError(f"the transformers {version} sdist has no tests/{', tests/'.join(missing)}")
        for name, text in STUBS.items():
            path = staging / name
            if not path.exists():
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(text)
        (staging / "TRANSFORMERS_VERSION").write_text(version + "\n")
        if target.exists():
            shutil.rmtree(target)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(staging), str(target))
    return target


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", help="transformers version (default: the installed one)")
    parser.add_argument("--force", action="store_true", help="download again even if the cache is complete")
    args = parser.parse_args()
    print(fetch(args.version, args.force))
