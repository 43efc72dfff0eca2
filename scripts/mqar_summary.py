# Summary of a gpu-mqar.sh grid: best learning rate per setting, from result.json or, for runs
# stopped early, from their last evaluation in metrics.jsonl.
#   python3 scripts/mqar_summary.py RUN_DIR OUT_JSON
import json, os, sys
d, out = sys.argv[1], sys.argv[2]
best = {}
for r in sorted(os.listdir(d), key=lambda s: int(s[3:])):
    name, lr = open(f"{d}/{r}/name").read().strip().split("|")
    row = {"name": name, "lr": float(lr), "finished": False, "steps": 0, "accuracy": 0.0, "best": 0.0, "params": 0, "tokens_per_s": 0.0}
    try:
        res = json.load(open(f"{d}/{r}/out/result.json"))
        row.update(finished=True, steps=res.get("steps", 0), accuracy=100 * res["eval_accuracy"], best=100 * res["best_accuracy"],
                   params=res["parameters"], tokens_per_s=res["tokens_per_s"])
    except Exception:
        evals = []
        try:
            for line in open(f"{d}/{r}/out/metrics.jsonl"):
                m = json.loads(line)
                if "eval_accuracy" in m: evals.append(m)
        except Exception:
            pass
        if not evals:
            print(f"{name} lr {lr}: no evaluation:", open(f"{d}/{r}/log").read()[-300:].replace("\n", " | "))
            continue
        row.update(steps=evals[-1].get("step", 0), accuracy=100 * evals[-1]["eval_accuracy"], best=100 * max(e["eval_accuracy"] for e in evals),
                   tokens_per_s=evals[-1].get("tokens_per_s", 0.0))
    if name not in best or row["best"] > best[name]["best"]: best[name] = row
print(f"\nMQAR T=256 N=16 V=8192, 2 layers (best of the learning rates): accuracy %")
print(f"{'setting':32s} {'params':>9s} {'lr':>7s} {'steps':>6s} {'final':>7s} {'best':>7s} {'tok/s':>10s}")
for r in best.values():
    print(f"{r['name']:32s} {r['params']:9d} {r['lr']:7.0e} {r['steps']:6d} {r['accuracy']:7.2f} {r['best']:7.2f} {r['tokens_per_s']:10.0f}"
          + ("" if r["finished"] else "  (stopped)"))
json.dump(list(best.values()), open(out, "w"), indent=1)
