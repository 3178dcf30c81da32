"""Where the image's scGenePT code comes from: the authors' repository at one commit.

scGenePT (Istrate et al. 2024) is published as a GitHub repository only, not as a
package: its modules (``models/scGenePT.py``, ``utils/data_loading.py``,
``utils/scgpt_config.py``) are imported from the repository's root, which the image puts
on ``PYTHONPATH``. At build time the Dockerfile runs this file, which downloads the
repository's archive at :data:`COMMIT`, unpacks it into ``/opt/scgenept`` and checks
every module the entrypoint loads against its git blob hash at that commit, so the
image holds exactly that commit's code whatever the archive's bytes are.

Usage (build time)::

    python scgenept_source.py DEST
"""

from __future__ import annotations

import hashlib
import io
import shutil
import sys
import tarfile
import urllib.request
from pathlib import Path

REPOSITORY = "czi-ai/scGenePT"
#: The newest commit of czi-ai/scGenePT's main branch when this image was written
#: (2025-01-22, "Adding metrics evaluation code").
COMMIT = "5847c57e4cccd9949a7f0b5f3775d5dcae5a5eac"
ARCHIVE_URL = f"https://github.com/{REPOSITORY}/archive/{COMMIT}.tar.gz"

#: Git blob hashes (sha1 of ``b"blob <size>\0" + content``, what ``git ls-tree`` shows)
#: of the files at :data:`COMMIT` that the image needs: the modules the entrypoint
#: imports and the licence.
BLOBS = {
    "models/scGenePT.py": "8f4a3fe82648d9fde49f2f7f4d8d2ad6ca73f700",
    "utils/data_loading.py": "b66d95fd325366844382e384199d3fbec6646437",
    "utils/scgpt_config.py": "c89387cf9effd37525467693878eeccb3d7b9cf5",
    "LICENSE": "20945241ef64fef3bd13336d8bfa2ffab335fc0a",
}


def git_blob_sha1(data: bytes) -> str:
    """The git object name of a file with content ``data``."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()  # noqa: S324 - git's hash


def unpack(archive: bytes, dest: Path) -> list[str]:
    """Unpack the files of :data:`BLOBS` from a GitHub archive into ``dest`` and verify them.

    Only those files are written (nothing else of the repository is needed at run time);
    each must be a regular file whose git blob hash is the one recorded for the commit.

    Returns
    -------
    The paths written, relative to ``dest``.

    Raises
    ------
    ValueError
        A file is missing from the archive, is not a regular file, or differs from the
        commit's.
    """
    dest = Path(dest)
    found: dict[str, bytes] = {}
    with tarfile.open(fileobj=io.BytesIO(archive), mode="r:gz") as tar:
        for member in tar.getmembers():
            # GitHub archives hold one top folder, <repo>-<commit>/.
            relative = member.name.split("/", 1)[1] if "/" in member.name else ""
            if relative in BLOBS:
                if not member.isfile():
                    msg = f"{relative} in the archive of {REPOSITORY}@{COMMIT} is not a regular file"
                    raise ValueError(msg)
                found[relative] = tar.extractfile(member).read()
    missing = sorted(set(BLOBS) - set(found))
    if missing:
        msg = f"the archive of {REPOSITORY}@{COMMIT} lacks {', '.join(missing)}"
        raise ValueError(msg)
    for relative, data in found.items():
        if git_blob_sha1(data) != BLOBS[relative]:
            msg = (f"{relative} from the archive of {REPOSITORY}@{COMMIT} has blob hash "
                   f"{git_blob_sha1(data)}, expected {BLOBS[relative]}")
            raise ValueError(msg)
    for relative, data in sorted(found.items()):
        target = dest / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
    (dest / "COMMIT").write_text(COMMIT + "\n")
    return sorted(found)


def main(dest: str) -> None:
    with urllib.request.urlopen(ARCHIVE_URL, timeout=300) as response:  # noqa: S310 - fixed https URL
        archive = response.read()
    target = Path(dest)
    if target.exists():
        shutil.rmtree(target)
    written = unpack(archive, target)
    print(f"scGenePT {COMMIT}: {', '.join(written)} -> {target}")


if __name__ == "__main__":
    main(*sys.argv[1:2] or ["/opt/scgenept"])
