"""Apply a profile: ``python -m ops.profile profiles/tiny.yaml`` merges it into params.yaml.

Only the keys the profile names change; comments and order in params.yaml are kept (ruamel round trip),
and the merged result is validated before anything is written.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ruamel.yaml import YAML

from blockdrop.config import ParamsError, parse_params


def merge(base: dict, override: dict, prefix: str = "") -> None:
    """Recursively copy ``override`` into ``base`` in place; a key absent from ``base`` is an error."""
    for key, value in override.items():
        if key not in base:
            raise ParamsError(f"{prefix}{key}: unknown key in profile")
        if isinstance(value, dict) and isinstance(base[key], dict):
            merge(base[key], value, f"{prefix}{key}.")
        else:
            base[key] = value


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("profile", type=Path)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    args = parser.parse_args(argv)
    yaml = YAML()
    yaml.preserve_quotes = True  # '"0 3 * * 1"' stays quoted, as written
    params = yaml.load(args.params)
    try:
        merge(params, YAML(typ="safe").load(args.profile) or {})
        parse_params(YAML(typ="safe").load(_dump(yaml, params)))
    except ParamsError as e:
        print(f"error: profile {args.profile}: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    args.params.write_text(_dump(yaml, params))
    print(f"applied {args.profile} to {args.params}")


def _dump(yaml: YAML, data: object) -> str:
    from io import StringIO

    buf = StringIO()
    yaml.dump(data, buf)
    return buf.getvalue()


if __name__ == "__main__":
    main()
