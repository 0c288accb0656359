"""Cheap check that the MiniZoo and the target suite fit together: for every target, a linear probe
(logistic regression on frozen pooled features) or a short fine-tune (10 epochs, SGD lr 0.01, Nesterov,
cosine, batch 64, the target's train augmentation) of each member and of a random initialisation.

    python benchmarks/minizoo_transfer_check.py probe|finetune [member,member,...]

Uses the MiniZoo in $ZOOTUNE_CACHE (or the default cache); builds nothing. One thread.
"""
import os, sys, time, torch, numpy as np, copy
torch.set_num_threads(1)
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler
from zootune.suite.targets import TARGETS, get_target
from zootune.minizoo import load_minizoo, minizoo_arch, pooled_features, MEMBERS
from zootune.models.heads import replace_head, new_linear_head
CACHE = os.environ.get("ZOOTUNE_CACHE")
mode = sys.argv[1]
names = [m.name for m in MEMBERS]
zoo = load_minizoo(CACHE, build_if_missing=False, members=sys.argv[2].split(",") if len(sys.argv) > 2 else None)
models = dict(zoo.items())
torch.manual_seed(0); models["scratch"] = minizoo_arch()()
def feats(m, ds):
    m.eval()
    with torch.no_grad():
        return torch.cat([pooled_features(m, ds.images[i:i+256]) for i in range(0, len(ds), 256)]).numpy()
def finetune(m, splits, epochs=10, lr=0.01):
    torch.manual_seed(0)
    m = copy.deepcopy(m); replace_head(m, new_linear_head(m.num_features, splits.num_classes))
    opt = torch.optim.SGD(m.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    n = len(splits.train); steps = epochs * (n // 64); sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    m.train()
    for e in range(epochs):
        perm = torch.randperm(n)
        for b in range(n // 64):
            idx = perm[b*64:(b+1)*64]
            x = torch.stack([splits.train[i][0] for i in idx]); y = splits.train.labels[idx]
            loss = F.cross_entropy(m(x), y); opt.zero_grad(); loss.backward(); opt.step(); sched.step()
    m.eval()
    with torch.no_grad():
        return 100 * (m(splits.test.images).argmax(1) == splits.test.labels).float().mean().item()
for tname in TARGETS:
    s = get_target(tname, seed=0, cache_dir=CACHE)
    row = []
    for mname, m in models.items():
        t = time.time()
        if mode == "probe":
            sc = StandardScaler().fit(feats(m, s.train))
            clf = LogisticRegression(max_iter=3000, C=0.5).fit(sc.transform(feats(m, s.train)), s.train.labels.numpy())
            acc = 100 * clf.score(sc.transform(feats(m, s.test)), s.test.labels.numpy())
        else:
            acc = finetune(m, s)
        row.append(f"{mname}={acc:.1f}")
        print(tname, mname, f"{acc:.1f}", f"{time.time()-t:.0f}s", flush=True)
    print("ROW", tname, " ".join(row), flush=True)
