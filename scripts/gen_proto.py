"""Generate the Python protocol code (tandem/v1/*_pb2*.py) from proto/tandem/v1/*.proto.

python -m scripts.gen_proto            # write tandem/v1/
python -m scripts.gen_proto --check    # exit 1 if the generated files are stale
"""

from __future__ import annotations

import argparse
import filecmp
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROTO_ROOT = ROOT / "proto"


def generate(out: Path) -> list[Path]:
    from grpc_tools import protoc

    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in PROTO_ROOT.rglob("*.proto"))
    args = ["protoc", f"-I{PROTO_ROOT}", f"--python_out={out}", f"--pyi_out={out}", f"--grpc_python_out={out}", *protos]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    generated = sorted(p for p in (out / "tandem" / "v1").glob("*_pb2*.py*"))
    (out / "tandem" / "v1" / "__init__.py").write_text('"""Generated protocol code: do not edit; see proto/."""\n')
    return generated


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args()
    if args.check:
        with tempfile.TemporaryDirectory() as tmp:
            fresh = generate(Path(tmp))
            stale = [p.name for p in fresh if not filecmp.cmp(p, ROOT / "tandem" / "v1" / p.name, shallow=False)]
        if stale:
            print(f"stale generated files: {', '.join(stale)}; run python -m scripts.gen_proto", file=sys.stderr)
            sys.exit(1)
        return
    for path in generate(ROOT):
        print(path.relative_to(ROOT))


if __name__ == "__main__":
    main()
