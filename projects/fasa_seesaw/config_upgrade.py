# Copyright (c) fasa_seesaw contributors.
"""
python -m fasa_seesaw.config_upgrade OLD.yaml NEW.yaml: a config (e.g. a run's saved config.yaml)
with the keys that moved (fasa_seesaw.config.RENAMED_KEYS) under their new names.
"""

import argparse
import os
import sys
import yaml

from .config import upgrade_config_dict


def main(argv=None) -> int:
    """Write NEW.yaml: OLD.yaml with the moved keys under their new names (never overwrites)."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("old")
    parser.add_argument("new")
    args = parser.parse_args(argv)
    if os.path.exists(args.new):
        print(f"error: {args.new} exists; choose another output path", file=sys.stderr)
        return 1
    with open(args.old, encoding="utf-8") as f:
        data = yaml.safe_load(f)
    with open(args.new, "x", encoding="utf-8") as f:
        yaml.safe_dump(upgrade_config_dict(data), f, sort_keys=False)
    print(f"wrote {args.new}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
