"""mixllm-jax command line: train, evaluate and query routers.

    mixllm-jax train --data DIR_OR_JSONL --models models.json --budget 25% --out checkpoints/NAME
    mixllm-jax eval  --router checkpoints/NAME --data ... --reference gpt-4-1106-preview --out runs/eval
    mixllm-jax route --router checkpoints/NAME "some prompt" ["another" ...]
    mixllm-jax run                 # the main job: train on the RouterBench slice, evaluate on its test split
    mixllm-jax ablation features   # feature variants on a validation part of train (also domains, ridge, truncation)
    mixllm-jax simulate            # a query stream under load: quality, cost, waits, satisfaction
    mixllm-jax experiment NAME     # latency | continual | llm-changes | out-of-domain | ope (JSON, table, plot)
    mixllm-jax ope --log LOG --router checkpoints/NAME   # off-policy value of a router from a served log
    mixllm-jax serve --checkpoint checkpoints/NAME --backends backends.yaml   # HTTP router + proxy
    mixllm-jax bench --quick       # throughput suite (JSON, markdown, plots in runs/bench)
    mixllm-jax hash-key [--generate]   # the SHA-256 of an API key, for serve --api-keys
    mixllm-jax distill-encoder --out runs/static   # the static encoder tier; then --encoder static:runs/static

Exit status: 0 on success; 2 on a user error (bad input, a missing file, a refused option: one line,
"mixllm-jax: error: ..."); 1 on an internal error (one line, "mixllm-jax: internal error: ..."; see
util/command.py). --debug (before the command) shows the traceback instead.

The commands live in offline.py (train, eval, ablation), routing.py (route, ope), experiments.py
(simulate, experiment), serving.py (serve, hash-key) and tools.py (bench, distill-encoder); the
parser and `run` (train then eval) here.

route, serve, train, eval and run keep JAX's compiled code in a persistent cache
($MIXLLM_CACHE or ~/.cache/mixllm-jax, in jax/; MIXLLM_COMPILATION_CACHE=off disables it).
"""

from __future__ import annotations

import argparse
import os

from mixllm_jax.cli.experiments import cmd_experiment, cmd_simulate
from mixllm_jax.cli.offline import cmd_ablation, cmd_eval, cmd_train
from mixllm_jax.cli.routing import cmd_ope, cmd_route
from mixllm_jax.cli.serving import cmd_hash_key, cmd_serve
from mixllm_jax.cli.tools import cmd_bench, cmd_distill
from mixllm_jax.util.command import EXIT_OK, run_command

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # no "PyTorch was not found" banner
# commands that start from the persistent compilation cache (serve too: its --compilation-cache, default
# the same folder, is applied when the service loads)
COMPILATION_CACHED = ("route", "train", "eval", "run")


def cmd_run(args):
    """Train on the RouterBench slice's train split, evaluate on its test split: `train` then `eval`,
    each with its own defaults but for run's options."""
    ap, ref = build_parser(), "gpt-4-1106-preview"
    router_dir = cmd_train(ap.parse_args(["train", "--max-length", str(args.max_length), "--truncation",
                                          args.truncation, "--budget", args.budget, "--budget-reference", ref,
                                          "--out", str(args.router_out)]))
    cmd_eval(ap.parse_args(["eval", "--router", str(router_dir), "--reference", ref, "--out", str(args.report_out)]))


def build_parser() -> argparse.ArgumentParser:
    """The `mixllm-jax` parser: one sub-command per job, every option with its help."""
    ap = argparse.ArgumentParser(prog="mixllm-jax", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--debug", action="store_true", help="show the traceback of an error (else one line, exit 2)")
    sub = ap.add_subparsers(dest="command", required=True)

    def data_args(p):
        p.add_argument("--data", help="RouterBench folder or long-format JSONL (default: the shared RouterBench slice)")
        p.add_argument("--models", help="models file (prices per million tokens; default: RouterBench's models.json)")

    def config_args(p):
        from mixllm_jax.core.config import FEATURE_MODES

        p.add_argument("--encoder", default=None,
                       help="HF id or local folder (default all-MiniLM-L6-v2), or static:DIR for a static encoder "
                            "made by distill-encoder")
        p.add_argument("--max-length", type=int, default=128, help="tokens kept per prompt")
        p.add_argument("--truncation", choices=("left", "right"), default="left",
                       help="which end of a long prompt is cut (left keeps the question at the end)")
        p.add_argument("--epochs", type=int, default=300, help="tag-enhanced head training epochs")
        p.add_argument("--tag-weight", type=float, default=1.0, help="weight of the tag losses (0: regression only)")
        p.add_argument("--features", choices=FEATURE_MODES, default="raw+domain",
                       help="bandit features: embedding + nearest-domain one-hot (tag-enhanced), + soft domain "
                            "membership, the head's features, or the raw embedding")
        p.add_argument("--domains", type=int, default=None,
                       help="derive N domains by k-means of the embeddings (default: the data's tags; "
                            "20 k-means domains when it has none)")
        p.add_argument("--no-head", action="store_true", help="train no tag head; route on raw encoder embeddings")
        p.add_argument("--budget", default="25%",
                       help="operating point: mean cost per query as a share of the reference LLM's "
                            "(default 25%%), met on a held-out part of train with a mixture of two settings")
        p.add_argument("--budget-reference", default=None,
                       help="the LLM of --budget (default: the most expensive one)")
        p.add_argument("--budget-usd", type=float, default=None, help="operating point: mean USD per query")
        p.add_argument("--cost-weight", type=float, default=None, help="operating point: lambda (quality per USD)")
        p.add_argument("--finetune-encoder", action="store_true",
                       help="fine-tune the encoder on the training outcomes first (RouterDC-style contrastive "
                            "and regression losses; LoRA or the top layers; saved in the checkpoint)")
        p.add_argument("--finetune-method", choices=("lora", "top"), default="lora",
                       help="low-rank adapters on the top layers' matrices, or the top layers' weights")
        p.add_argument("--finetune-layers", type=int, default=1, help="how many top encoder layers are adapted")
        p.add_argument("--finetune-rank", type=int, default=8, help="LoRA rank")
        p.add_argument("--finetune-epochs", type=int, default=8,
                       help="most fine-tuning epochs (early stopping on a held-out 10%% of train)")
        p.add_argument("--finetune-lr", type=float, default=None, help="fine-tuning learning rate (default 1e-3)")

    p = sub.add_parser("train", help="train a router on logged outcomes and save it with its budget")
    data_args(p)
    config_args(p)
    p.add_argument("--out", default="checkpoints/router",
                   help="checkpoint directory; each train adds a numbered step (the last 3 are kept)")
    from mixllm_jax.offline import distributed  # light: jax is imported when a command runs

    distributed.add_arguments(p)
    p.set_defaults(fn=cmd_train)

    p = sub.add_parser("eval", help="evaluate a saved router and the baselines: table, report.json, plot")
    data_args(p)
    p.add_argument("--router", required=True, help="a checkpoint directory (see train --out)")
    p.add_argument("--step", type=int, help="checkpoint step (default: the latest)")
    p.add_argument("--train-data", help="data the baselines are fitted on (default: --data's train split)")
    p.add_argument("--reference", default=None,
                   help="the LLM whose totals are 100%% (default: the data's most expensive LLM in the models file); "
                        "checked before any work")
    p.add_argument("--out", default="runs/eval", help="folder for report.json, report.md, curves.png")
    p.add_argument("--split", default="test", help="the split of --data evaluated on (e.g. ood)")
    p.add_argument("--no-baselines", action="store_true", help="evaluate the router alone (no train split needed)")
    p.add_argument("--compare", metavar="CHECKPOINT",
                   help="another router (e.g. on another encoder) run on the same queries as method 'compare', "
                        "with the paired bootstrap of this router minus it")
    p.add_argument("--cost-weights", help="the lambda grid of the sweeps, a comma list (quality per USD), e.g. "
                                          "0,10,100,1000 (default: 0 and 161 values from 0.1 to 1e7)")
    p.add_argument("--budgets", help="budgets to read quality at, comma list of %% of the reference's cost, e.g. "
                                     "10,24.18,50: the table's columns, the router run at each budget "
                                     "(mixllm@budgets) and the budget table (default: 24.18)")
    p.add_argument("--full-report", action="store_true",
                   help="report.json with every per-task operating point (default: per-task AIQ and budgets only)")
    distributed.add_arguments(p)
    p.set_defaults(fn=cmd_eval)

    p = sub.add_parser("run", help="the main job: train on the RouterBench slice, evaluate on its test split")
    p.add_argument("--max-length", type=int, default=128, help="tokens kept per prompt")
    p.add_argument("--truncation", choices=("left", "right"), default="left", help="which end of a long prompt is cut")
    p.add_argument("--budget", default="24.18%", help="operating point, share of GPT-4's cost (the paper's 24.18%%)")
    p.add_argument("--router-out", default="checkpoints/routerbench", help="where the router is saved")
    p.add_argument("--report-out", default="runs/routerbench", help="where the report goes")
    p.set_defaults(fn=cmd_run)

    p = sub.add_parser("ablation", help="train variants of a config on part of train, compare them on the rest: "
                                        "features, domains, ridge, truncation or encoder fine-tuning")
    data_args(p)
    config_args(p)
    p.add_argument("kind", choices=("features", "domains", "ridge", "truncation", "finetune"),
                   help="what varies: bandit features, domains (tags vs k-means), ridge selection, truncation, encoder fine-tuning")
    p.add_argument("--reference", default=None,
                   help="the LLM whose totals are 100%% (default: the most expensive LLM of the data)")
    p.add_argument("--out", default=None, help="report folder (default runs/ablation-KIND)")
    p.set_defaults(fn=cmd_ablation)

    p = sub.add_parser("route", help="route prompts with a saved router and explain each decision")
    p.add_argument("--router", required=True, help="a checkpoint directory (see train --out)")
    p.add_argument("--step", type=int, help="checkpoint step (default: the latest)")
    p.add_argument("--cost-weight", type=float, help="override lambda (quality per USD)")
    p.add_argument("--budget", help="override the operating point: share of the most expensive LLM's cost, e.g. 30%%")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the exploration draws when the saved policy explores (Thompson, softmax, epsilon)")
    p.add_argument("prompts", nargs="+", help="the prompts to route")
    p.set_defaults(fn=cmd_route)

    def experiment_data_args(p):  # simulate, experiment: train / test (/ ood) splits of any log
        data_args(p)
        p.add_argument("--reference", default=None,
                       help="the LLM whose logged totals are 100%% (default gpt-4-1106-preview)")

    p = sub.add_parser("simulate", help="stream the test split through a router under load (latency model; "
                                        "RouterBench latency profiles are assumptions)")
    experiment_data_args(p)
    p.add_argument("--router", help="a checkpoint directory (default: train one on the RouterBench slice)")
    p.add_argument("--rate", type=float, default=10.0, help="queries per second (default 100 per 10 s)")
    p.add_argument("--arrival", choices=("uniform", "poisson"), default="uniform", help="arrival process")
    p.add_argument("--batch-s", type=float, default=1.0, help="routing window in seconds")
    p.add_argument("--refresh-s", type=float, default=10.0, help="waiting times refresh interval (0: continuous)")
    p.add_argument("--tolerance", type=float, default=30.0, help="a query waiting longer scores quality 0")
    p.add_argument("--cost-weight", type=float, help="lambda (default: calibrated to 24.18%% of GPT-4's cost)")
    p.add_argument("--beta", type=float, default=0.1, help="latency penalty weight")
    p.add_argument("--tau", type=float, default=10.0, help="wait (s) above which the penalty starts")
    p.add_argument("--alpha", type=float, default=0.01, help="LinUCB exploration weight")
    p.add_argument("--repeat", type=int, default=1, help="stream the test split this many times")
    p.add_argument("--seed", type=int, default=0, help="seed of the arrival process and random baselines")
    p.add_argument("--quick", action="store_true", help="a small subset on one-hot task features (seconds)")
    p.add_argument("--out", default="runs/simulate", help="folder for simulate.json/.md/.png")
    p.set_defaults(fn=cmd_simulate)

    p = sub.add_parser("experiment", help="reproduce a paper experiment: latency, continual, llm-changes, out-of-domain; "
                                          "or check off-policy evaluation against the truth (ope)")
    p.add_argument("name", choices=("latency", "continual", "llm-changes", "out-of-domain", "ope"),
                   help="the experiment to run")
    experiment_data_args(p)
    p.add_argument("--quick", action="store_true", help="a small subset on one-hot task features (seconds)")
    p.add_argument("--out", default="runs/experiments", help="folder for NAME.json/.md/.png")
    p.add_argument("--seeds", help="continual, out-of-domain (its ood split): comma-separated seeds (default 0,1,2)")
    p.add_argument("--splits", help="continual: comma-separated offline fractions, no supplementary ones "
                                    "(default 0.8,0.5,0.3 plus 0.1,0.05)")
    p.add_argument("--modes", help="continual, out-of-domain: comma-separated online modes among none, refined, "
                                   "binary, refined_greedy, refined_thompson")
    p.add_argument("--no-held-out", action="store_true",
                   help="out-of-domain: only the data's ood split (no held-out-task streams)")
    p.add_argument("--no-grow-domains", action="store_true",
                   help="out-of-domain: no domains opened online (queries keep their nearest trained domain)")
    p.set_defaults(fn=cmd_experiment)

    p = sub.add_parser("ope", help="off-policy evaluation: estimate a saved router's value from a log of decisions "
                                   "with propensities (IPS, SNIPS, doubly robust, 95%% intervals)")
    p.add_argument("--log", required=True, help="a decision log (JSONL: x, model, reward, propensity; see ope.write_log) "
                                               "or a server --log-dir folder (requests/ and journal/)")
    p.add_argument("--router", required=True, help="a checkpoint directory: the target policy's router")
    p.add_argument("--step", type=int, help="checkpoint step (default: the latest)")
    p.add_argument("--cost-weight", type=float, help="evaluate the router at this lambda (quality per USD)")
    p.add_argument("--budget", help="evaluate the router at this budget, share of the most expensive LLM's cost, e.g. 30%%")
    p.add_argument("--explore", choices=("greedy", "ucb", "thompson"), default="greedy",
                   help="the target's exploration (default greedy: no bonus)")
    p.add_argument("--alpha", type=float, default=None, help="exploration weight in posterior s.d.s (ucb, thompson)")
    p.add_argument("--temperature", type=float, default=0.0, help="the target's softmax temperature (0: deterministic)")
    p.add_argument("--epsilon", type=float, default=0.0, help="the target's share of uniformly random LLMs")
    p.add_argument("--out", help="also write the estimates as JSON here")
    p.set_defaults(fn=cmd_ope)

    p = sub.add_parser("serve", help="HTTP router: /v1/route, OpenAI-compatible /v1/chat/completions proxy, "
                                     "feedback, live LLM add/remove, /metrics")
    from mixllm_jax.serve import options  # light: the web stack is imported when the server starts

    options.add_serve_arguments(p)
    p.set_defaults(fn=cmd_serve)

    p = sub.add_parser("hash-key", help="the SHA-256 of an API key (read from stdin) as a serve --api-keys entry")
    p.add_argument("--generate", action="store_true", help="make a new random key and print it with its hash")
    p.add_argument("--name", default="client", help="the entry's name (default: client)")
    p.add_argument("--roles", nargs="+", default=["route", "feedback"], choices=("route", "feedback", "admin"),
                   help="the entry's roles (default: route feedback)")
    p.set_defaults(fn=cmd_hash_key)

    p = sub.add_parser("distill-encoder", help="distil a static encoder (per-token vectors, Model2Vec's method) "
                                               "from the installed MiniLM: minutes on CPU")
    p.add_argument("--out", required=True, help="folder for model.safetensors, config.json and the tokenizer")
    p.add_argument("--source", default=None, help="the transformer distilled (default all-MiniLM-L6-v2)")
    p.add_argument("--dims", type=int, default=256, help="PCA dimensions kept (default 256)")
    p.add_argument("--weighting", choices=("zipf", "sif", "none"), default="zipf",
                   help="token weights by vocabulary rank: log(1 + rank) (zipf, default), SIF, or none")
    p.add_argument("--batch-size", type=int, default=512, help="tokens per transformer call")
    p.set_defaults(fn=cmd_distill)

    p = sub.add_parser("bench", add_help=False,
                       help="throughput suite: route/update/text-to-decision rates, peers side by side "
                            "(options: mixllm-jax bench --help)")
    p.set_defaults(fn=cmd_bench)

    return ap


def main(argv=None) -> int:
    """Run one command: returns 0 when it succeeds; an error raises SystemExit with status 2 (a user
    error) or 1 (an internal error), as argparse does for bad options (util.command.run_command)."""
    ap = build_parser()
    args, rest = ap.parse_known_args(argv)
    if args.command == "bench":  # its own options, and its own exit status
        status = run_command(lambda: cmd_bench(args, rest), debug=args.debug)
        return status if type(status) is int else EXIT_OK
    if rest:
        ap.error(f"unrecognized arguments: {' '.join(rest)}")
    if getattr(args, "kind", None) and args.out is None:
        args.out = f"runs/ablation-{args.kind}"
    if args.command in COMPILATION_CACHED:
        from mixllm_jax.text.cache import enable_compilation_cache

        enable_compilation_cache()
    run_command(lambda: args.fn(args), debug=args.debug)  # what a command returns (a path, estimates) is not a status
    return EXIT_OK
