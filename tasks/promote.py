"""DVC stage `promote`: the registry gate (challenger vs champion on the same held-out seeds).

Thin: reads params, calls dynaplan.promotion.run_gate, which writes reports/promote/decision.json.
With no challenger it records `no_candidate` and succeeds; a refused promotion (an unevaluated
version) exits 1 with the reason.
"""

from __future__ import annotations

import sys

from dynaplan.config import load_params, usage_errors_exit_2
from dynaplan.promotion import PromotionError, run_gate


@usage_errors_exit_2()
def main() -> int:
    params = load_params()
    try:
        decision = run_gate(params)
    except PromotionError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    if decision is None:
        print("no_candidate: no version has the alias 'challenger'; nothing to decide")
        return 0
    print(f"{decision.outcome}: {decision.reason}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
