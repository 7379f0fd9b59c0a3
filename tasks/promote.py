"""DVC stage `promote`: the registry gate (challenger vs champion on the same held-out seeds).

Thin: reads params, calls dynaplan.promotion.run_gate, which writes reports/promote/decision.json.
A refused promotion (no challenger, an unevaluated version) exits 1 with the reason.
"""

from __future__ import annotations

import sys

from dynaplan.config import EXIT_USAGE, ConfigError, load_params
from dynaplan.promotion import PromotionError, run_gate


def main() -> int:
    try:
        params = load_params()
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USAGE
    try:
        decision = run_gate(params)
    except PromotionError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"{decision.outcome}: {decision.reason}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
