"""A chat model's system prompt compressed into a state: does the model still follow it?

SmolLM2-135M-Instruct (float32, its ChatML template). System prompts: experiments/data/
chat_system_prompts.json (written for this experiment, 650-820 tokens each: a persona, rules and
facts, and 10-12 questions per prompt whose answer is only in the prompt; "split" says which
prompt choices were made on (tuning) and which are reported). For each prompt:

  full prompt      the model reading the system turn, then the user's question
  state 1/8, 1/32  compress_prompt(..., chat=True) with the default recipe at that budget
  sink+recent      StreamingLLM: the first 4 tokens and the most recent ones, equal memory
  snapkv           the tokens the prompt's last 32 queries attend to most, equal memory
  retrieval+recent DuoAttention-style: the state's retrieval heads keep every token, the other
                   heads sink + recent, equal memory
  no prompt        the question alone at the same positions (no system turn)

Every method answers each question greedily (32 new tokens) from the user turn rendered after
the system turn (compress.chat.turns_after_system_ids). Metrics per method: fact recall = the
share of questions whose answer string appears in the reply (case-insensitive); "of full" = the
share of the questions the full-prompt model gets right that the method gets right too (the
target: >= 90% at 1/8); and, teacher-forced on the full-prompt model's reply, KL(full || method)
per token and top-1 agreement. No setting was tuned on these prompts (the recipe is
compress_prompt's default).

    python experiments/compress_chat.py --output docs/results/compress_chat
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from ntk_attention.compress import (
    CompressConfig,
    compress_prompt,
    system_prompt_ids,
    turns_after_system_ids,
)
from ntk_attention.compress.distill import kl_divergence
from ntk_attention.compress.teacher import prompt_prefix, retrieval_scores
from ntk_attention.compress.token_selection import sink_and_recent, snapkv
from ntk_attention.provenance import environment, summary_line
from ntk_attention.tuner import NTKConfig, get_ntk_model

sys.path.insert(0, str(Path(__file__).parent))
import compress_prompt as shared  # noqa: E402  (the model, eviction states)

DATA = Path(__file__).parent / "data" / "chat_system_prompts.json"
NEW_TOKENS = 32
BUDGETS = {"1/8": 1 / 8, "1/32": 1 / 32}


@contextlib.contextmanager
def no_prompt(model, m):
    """The base model at positions m.. (a zero state only shifts the positions)."""
    ntk = get_ntk_model(model, NTKConfig(feature_map="exp", r=1, position_offset=m, sink_tokens=0))
    try:
        yield ntk
    finally:
        ntk.unload()


@contextlib.contextmanager
def compressed(model, tokenizer, system, config, seed):
    ntk = compress_prompt(model, tokenizer, system, chat=True, seed=seed, progress=False, config=config)
    try:
        yield ntk
    finally:
        ntk.unload()


@torch.no_grad()
def answer(model, ids: torch.Tensor, eos: int) -> torch.Tensor:
    out = model.generate(input_ids=ids, max_new_tokens=NEW_TOKENS, do_sample=False,
                         pad_token_id=eos, eos_token_id=eos)
    return out[0, ids.shape[1]:]


@torch.no_grad()
def forced_log_probs(model, ids: torch.Tensor, reply: torch.Tensor) -> torch.Tensor:
    """Log-probs of the next token at each position of ``reply`` after ``ids``."""
    whole = torch.cat([ids, reply[None]], 1)
    logits = model(input_ids=whole).logits[:, ids.shape[1] - 1 : whole.shape[1] - 1]
    return torch.log_softmax(logits.float(), -1)


def evaluate(method_model, prefix_ids, questions, tokenizer, full_replies, full_log_probs):
    rows = []
    for item, reply, reference in zip(questions, full_replies, full_log_probs, strict=True):
        turn = turns_after_system_ids(tokenizer, [{"role": "user", "content": item["question"]}])
        ids = turn if prefix_ids is None else torch.cat([prefix_ids[None], turn], 1)
        own = answer(method_model, ids, tokenizer.eos_token_id)
        text = tokenizer.decode(own, skip_special_tokens=True)
        log_probs = forced_log_probs(method_model, ids, reply)
        rows.append({
            "question": item["question"], "reply": text,
            "correct": item["answer"].lower() in text.lower(),
            "kl": kl_divergence(reference, log_probs).mean().item(),
            "top1": (reference.argmax(-1) == log_probs.argmax(-1)).float().mean().item(),
        })
    return rows


def run_prompt(model, tokenizer, spec, budgets, seed, log, changes, state_only=False):
    system = spec["system"]
    questions = spec["questions"]
    system_ids = system_prompt_ids(tokenizer, system)
    m = system_ids.numel()
    log(f"{spec['name']}: {m} system tokens, {len(questions)} questions")
    # The full-prompt model's replies: the references every method is compared with.
    full_replies, full_log_probs, full_rows = [], [], []
    for item in questions:
        turn = turns_after_system_ids(tokenizer, [{"role": "user", "content": item["question"]}])
        ids = torch.cat([system_ids[None], turn], 1)
        reply = answer(model, ids, tokenizer.eos_token_id)
        full_replies.append(reply)
        full_log_probs.append(forced_log_probs(model, ids, reply))
        text = tokenizer.decode(reply, skip_special_tokens=True)
        full_rows.append({"question": item["question"], "reply": text,
                          "correct": item["answer"].lower() in text.lower(), "kl": 0.0, "top1": 1.0})
    results = {"full prompt": {"rows": full_rows, "memory_fraction": 1.0}}

    prefix, _, window_mass = prompt_prefix(model, system_ids)
    retrieval = retrieval_scores(model, prefix, system_ids)
    layers, kv_heads = prefix.layers, prefix.geometry.kv_heads
    methods = []
    for name in budgets:
        fraction = BUDGETS[name]
        tokens = max(1, int(fraction * m))
        config = CompressConfig(memory_fraction=fraction, **changes)
        exact, rest, duo_fraction = shared.retrieval_and_recent(config, prefix, retrieval)
        methods += [
            (f"state {name}", lambda c=config: compressed(model, tokenizer, system, c, seed), None),
            (f"sink+recent {name}", lambda t=tokens: shared.eviction_state(
                model, prefix, sink_and_recent(m, t, layers, kv_heads, sink=4)), tokens / m),
            (f"snapkv {name}", lambda t=tokens: shared.eviction_state(model, prefix, snapkv(window_mass, t)),
             tokens / m),
            (f"retrieval+recent {name}", lambda r=rest, e=exact, c=config: shared.eviction_state(
                model, prefix, sink_and_recent(m, r, layers, kv_heads, sink=4), exact_heads=e,
                exact_bits=c.exact_bits), duo_fraction),
        ]
    methods.append(("no prompt", lambda: no_prompt(model, m), 0.0))
    if state_only:
        methods = [method for method in methods if method[0].startswith("state ")]
    for method, make, fraction in methods:
        started = time.perf_counter()
        with make() as ntk:
            seconds = time.perf_counter() - started
            report = getattr(ntk, "compression", None)
            rows = evaluate(ntk, None, questions, tokenizer, full_replies, full_log_probs)
        if report is not None:
            fraction = report.memory_fraction
        results[method] = {"rows": rows, "memory_fraction": fraction,
                           "seconds": seconds if report is not None else None}
        log(f"  {method:24s} facts {sum(r['correct'] for r in rows)}/{len(rows)}  "
            f"KL {statistics.mean(r['kl'] for r in rows):.3f}  "
            f"top1 {statistics.mean(r['top1'] for r in rows):.3f}")
    return {"name": spec["name"], "system_tokens": m, "results": results}


def summary(prompts) -> list[dict]:
    methods = list(prompts[0]["results"])
    out = []
    for method in methods:
        rows, of_full, right_full = [], 0, 0
        for prompt in prompts:
            full = prompt["results"]["full prompt"]["rows"]
            own = prompt["results"][method]["rows"]
            rows += own
            right_full += sum(f["correct"] for f in full)
            of_full += sum(f["correct"] and o["correct"] for f, o in zip(full, own, strict=True))
        out.append({
            "method": method,
            "memory_fraction": statistics.mean(p["results"][method]["memory_fraction"] for p in prompts),
            "facts": sum(r["correct"] for r in rows), "questions": len(rows),
            "of_full": of_full / right_full if right_full else None,
            "kl": statistics.mean(r["kl"] for r in rows),
            "top1": statistics.mean(r["top1"] for r in rows),
        })
    return out


def markdown(document) -> str:
    lines = ["# A chat model's system prompt, compressed (SmolLM2-135M-Instruct)", "",
             summary_line(document["environment"]), "",
             f"Prompts ({document['split']} split): "
             + ", ".join(f"{p['name']} ({p['system_tokens']} tokens, "
                         f"{len(p['results']['full prompt']['rows'])} questions)"
                         for p in document["prompts"]) + "; "
             "greedy replies of 32 tokens. facts = replies holding the answer; of full = the "
             "full-prompt model's correct answers the method also gets; KL / top-1 teacher-forced "
             "on the full-prompt model's replies."
             + (f" Recipe changed: {document['config_changes']}." if document["config_changes"] else ""), "",
             "| method | memory / system turn's KV cache | facts | of full | KL | top-1 |",
             "|---|---|---|---|---|---|"]
    for row in document["summary"]:
        of_full = "-" if row["of_full"] is None else f"{100 * row['of_full']:.0f}%"
        lines.append(f"| {row['method']} | {row['memory_fraction']:.3f} | {row['facts']}/"
                     f"{row['questions']} | {of_full} | {row['kl']:.3f} | {row['top1']:.3f} |")
    lines += ["", "Replies per question: the .json file beside this one."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budgets", nargs="+", default=list(BUDGETS), choices=list(BUDGETS))
    parser.add_argument("--split", default="report", choices=["report", "tuning"],
                        help="which prompts of the data file (default: report)")
    parser.add_argument("--exact-heads", type=int,
                        help="retrieval heads of the state and of retrieval+recent (default: the "
                        "recipe's count for the budget)")
    parser.add_argument("--exact-bits", choices=["float", "2", "4", "8"],
                        help="bits of the retrieval heads' kept tokens, of the state and of "
                        "retrieval+recent (default: the recipe's)")
    parser.add_argument("--set", nargs="+", default=[], metavar="FIELD=VALUE",
                        help="more CompressConfig changes, e.g. rereads=12 (ints, floats, None, text)")
    parser.add_argument("--state-only", action="store_true",
                        help="run the full prompt and the states only (no eviction baselines)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output", required=True)
    args = parser.parse_args()
    changes = shared.config_changes(args.set, "--set")
    if args.exact_heads is not None:
        changes["exact_heads"] = args.exact_heads
    if args.exact_bits is not None:
        changes["exact_bits"] = None if args.exact_bits == "float" else int(args.exact_bits)
    torch.set_num_threads(args.threads)
    model, tokenizer = shared.load_model()
    specs = [spec for spec in json.loads(DATA.read_text()) if spec["split"] == args.split]
    prompts = [run_prompt(model, tokenizer, spec, args.budgets, args.seed,
                          lambda line: print(line, flush=True), changes, args.state_only)
               for spec in specs]
    document = {"environment": environment(), "split": args.split,
                "config_changes": changes, "prompts": prompts,
                "summary": summary(prompts)}
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.with_suffix(".json").write_text(json.dumps(document, indent=2) + "\n")
    output.with_suffix(".md").write_text(markdown(document))
    print(markdown(document))


if __name__ == "__main__":
    main()
