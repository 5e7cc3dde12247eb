"""A saved router's decisions: route (prompts, each decision explained) and ope (its value on a logged policy)."""

from __future__ import annotations

import json
from pathlib import Path

from mixllm_jax.cli.offline import restore


def policy_from_args(router, args, base=None):
    """`base` (default: the router's policy) at --cost-weight or --budget, when given."""
    from mixllm_jax.core.config import Budget

    base = router.policy if base is None else base
    if args.cost_weight is not None:
        return router.policy_for(Budget("cost_weight", args.cost_weight), base)
    if args.budget is not None:
        return router.policy_for(Budget.parse(args.budget), base)
    return base


def cmd_route(args):
    import jax

    from mixllm_jax.util import progress

    with progress.step("loading the router"):
        router = restore(args)
    router.policy = p = policy_from_args(router, args)
    print(f"policy: cost weight {p.cost_weight:.4g}" + (f", {100 * p.mix:.1f}% at {p.mix_cost_weight:.4g}" if p.mix else "")
          + f"; explore {p.explore}" + (f", temperature {float(p.temperature):g}" if p.temperature else "")
          + (f", epsilon {float(p.epsilon):g}" if p.epsilon else "") + (f" (seed {args.seed})" if p.stochastic else ""))
    with progress.step(f"routing {len(args.prompts)} prompt(s) (the first call of a shape compiles)"):
        routes = router.route(args.prompts, key=jax.random.PRNGKey(args.seed) if p.stochastic else None)
    for text, r in zip(args.prompts, routes):
        print(f"> {text[:100]!r}\n  chosen: {r.model}" + (f"   (nearest domain: {r.domain})" if r.domain else ""))
        print(f"  {'LLM':40s} {'quality':>8s} {'cost $':>10s} {'uncert.':>8s} {'penalty':>8s} {'score':>9s}")
        for m in sorted(r.score, key=r.score.get, reverse=True):
            print(f"  {m:40s} {r.quality[m]:8.3f} {r.cost[m]:10.6f} {r.uncertainty[m]:8.4f} "
                  f"{r.penalty[m]:8.3f} {r.score[m]:9.4f}")


def cmd_ope(args):
    """Off-policy estimates of a saved router's policy from a log with propensities."""
    from mixllm_jax.offline import ope

    router = restore(args)
    policy = policy_from_args(router, args)
    policy = policy.replace(explore=args.explore, alpha=args.alpha if args.alpha is not None else policy.alpha,
                            temperature=args.temperature, epsilon=args.epsilon, beta=0.0)
    log = ope.read_log(args.log)
    if log.x.shape[1] != router.state.dim:
        raise ValueError(f"the log's features have {log.x.shape[1]} dimensions, the router's {router.state.dim}: "
                         "a log is evaluated with the router (features) it was served with")
    out = ope.evaluate_router_on_log(log, router.state, router.registry, policy)
    print(f"{out['n']} logged decisions; target policy: cost weight {float(policy.cost_weight):.4g}, explore "
          f"{policy.explore}, temperature {float(policy.temperature):g}, epsilon {float(policy.epsilon):g}")
    print(f"mean probability the target gives the logged LLM: {out['target_prob_of_logged_mean']:.3f}\n")
    print(f"  {'estimator':10s} {'value':>8s} {'95% interval':>22s} {'s.e.':>8s} {'ESS':>8s}")
    for k in ("ips", "snips", "dr"):
        e = out[k]
        print(f"  {k.upper():10s} {e['value']:8.4f} [{e['low']:9.4f}, {e['high']:9.4f}] {e['se']:8.4f} {e['ess']:8.1f}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
        print(f"\nwritten: {args.out}")
    return out
