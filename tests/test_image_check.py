"""scripts/image_check.py's two translations, checked without Docker: the Dockerfile it builds is
the project's with only the BuildKit secret mount removed, and the pip configuration it gives
the container names no place on this machine's disk. (``make image-check`` itself builds and
runs the image; it is its own CI step, never part of pytest.)
"""

from __future__ import annotations

from pathlib import Path

import dockerfile

from scripts import image_check
from tests.support.dockerfile import DOCKERFILE, instructions


def test_the_legacy_copy_differs_only_by_the_secret_mount(tmp_path: Path):
    legacy = dockerfile.parse_file(str(image_check.legacy_dockerfile(tmp_path)))
    original = instructions()
    assert [(c.cmd, c.value) for c in legacy] == [(c.cmd, c.value) for c in original]
    changed = [(a.flags, b.flags) for a, b in zip(original, legacy, strict=True)
               if a.flags != b.flags]
    assert changed == [(("--mount=type=secret,id=HF_TOKEN,env=HF_TOKEN",), ())]
    assert DOCKERFILE.read_text().count(image_check.SECRET_MOUNT) == 1


def test_the_containers_pip_config_names_no_local_path(tmp_path: Path):
    text = image_check.container_pip_config(tmp_path)
    assert text.startswith("[global]\n")
    for line in text.splitlines()[1:]:
        key, _, value = line.partition(" = ")
        for word in value.split():
            # Only URLs, and the files copied in under their container paths.
            assert not word.startswith("file:"), line
            if word.startswith("/"):
                assert word in (image_check.CONTAINER_CA,) or word.startswith(
                    image_check.CONTAINER_CONSTRAINTS), line
    copied = {p.name for p in tmp_path.iterdir()}
    assert {"pip.conf", "host-ca.crt", "constraints"} <= copied
