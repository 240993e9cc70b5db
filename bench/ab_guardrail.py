"""How fast the rollout's outcome guardrail sees a drop, and how often it cries wolf.

Simulated outcomes (production succeeds 80% of the time), checked after every 10 outcomes per arm
as the gateway checks after every meter batch; the rollback fires when the always-valid interval
of candidate - production success (alpha 0.05) lies entirely below -margin.

    python bench/ab_guardrail.py [--runs 200]
"""

from __future__ import annotations

import argparse
import random

from loragate.gateway import sequential


def first_alarm(rng: random.Random, candidate: float, margin: float, limit: int, production: float = 0.8) -> int | None:
    succ_c = succ_p = 0
    for n in range(1, limit + 1):
        succ_c += rng.random() < candidate
        succ_p += rng.random() < production
        if n % 10 == 0 and n >= 20 and sequential.rate_difference(succ_c, n, succ_p, n, 0.05).high < -margin:
            return n
    return None


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--limit", type=int, default=50_000, help="outcomes per arm before a run gives up")
    args = parser.parse_args()
    rng = random.Random(0)
    print("margin  true drop  rolled back  median outcomes per arm  90th percentile")
    for margin in (0.0, 0.02):
        for drop in (0.0, 0.02, 0.03, 0.05, 0.10):
            alarms = [first_alarm(rng, 0.8 - drop, margin, args.limit) for _ in range(args.runs)]
            found = sorted(n for n in alarms if n is not None)
            median = found[len(found) // 2] if found else None
            p90 = found[int(len(found) * 0.9)] if found else None
            print(f"{margin * 100:4.0f} pt  {drop * 100:7.0f} pt  {len(found) / args.runs:10.1%}  "
                  f"{median if median else '-':>22}  {p90 if p90 else '-':>15}")


if __name__ == "__main__":
    main()
