"""Excess of each variant's R over the per-point smallest R any variant found (all_seed*.log, chain_seed*.log,
verify3_seed*.json), per seed and model: mean R change, points > 2% above, worst point."""
import json, re, glob, collections
for s in (0, 1, 2):
    R = collections.defaultdict(dict)
    for f in (f"/work/notes/s6-f/all_seed{s}.log", f"/work/notes/s6-f/chain_seed{s}.log"):
        for line in open(f):
            m = re.match(r"(beta_vae\(beta=[\d.]+\)) (\S+)\s+R ([\d. na]+?)\s+attack", line)
            if m:
                R[m.group(1)][m.group(2)] = [float(v) for v in m.group(3).split()]
    try:
        for rec in json.load(open(f"/work/notes/s6-f/verify3_seed{s}.json")):
            R[rec["model"]]["verify3"] = rec["fixed"]
        for rec in json.load(open(f"/work/notes/s6-f/verify4_seed{s}.json")):
            R[rec["model"]]["verify4"] = rec["fixed"]
        for rec in []:
            R[rec["model"]]["verify3"] = rec["fixed"]
    except FileNotFoundError:
        pass
    for model, vs in R.items():
        ref = [min(v[i] for v in vs.values()) for i in range(25)]
        print(f"seed {s} {model}: reference = per-point min over {len(vs)} variants, mean {sum(ref)/25:.4f}")
        for name, v in vs.items():
            ex = [v[i] / ref[i] - 1 for i in range(25)]
            worst = max(range(25), key=lambda i: ex[i])
            print(f"   {name:16s} mean R {100*(sum(v)/sum(ref)-1):+.2f}%  points >2%: {sum(e > 0.02 for e in ex):2d}"
                  f"  worst {100*ex[worst]:+.1f}% (point {worst})")
