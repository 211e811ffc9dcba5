import sys, math
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[3]))
from cluster.sim.autoscale import KVPilotScaler, simulate_autoscale, default_startup_s
from cluster.autoscaling import ScalingInput, decide
from cluster.sim.simulator import make_setup
from cluster.sim import autoscale as A
from cluster.sim.synthetic import SYNTHETIC
from cluster.sim.cluster import SimCluster

minutes = float(sys.argv[1]); lo, hi = 2, int(sys.argv[2])
setup = make_setup(hi)
w = SYNTHETIC["multiscale_bursts"](5.0, math.ceil(5.0 * minutes * 60), seed=0, off_first=True)
log = {}
class Rec(KVPilotScaler):
    def __call__(self, obs):
        inp = ScalingInput(now_s=obs.now, current_replicas=obs.ready, replicas=obs.replicas, queued_requests=obs.queued,
                           kv_capacity_tokens=self.capacity, min_replicas=obs.min_replicas, max_replicas=obs.max_replicas,
                           target_replicas=obs.target)
        d, self.state = decide(inp, self.cfg, self.state)
        b = int(obs.now // 30)
        if b not in log:
            s = d.signals
            log[b] = (obs.ready, obs.target, d.kind, round(s.get("compute_usage", 0), 2), round(s.get("itl_s", 0) * 1e3),
                      sum(r.num_waiting for r in obs.replicas), sum(r.num_running for r in obs.replicas))
        return d.desired, d.kind
# capture requests
orig = SimCluster.run
got = {}
def run(self, trace, progress=None):
    orig(self, trace, progress); got["c"] = self
SimCluster.run = run
sc = Rec(setup.plan.num_blocks * setup.plan.block_size, default_startup_s(setup))
r = simulate_autoscale(w, sc, setup, min_replicas=lo, max_replicas=hi, initial_replicas=4, startup_s=default_startup_s(setup))
print(r.gpu_hours, r.serving.slo_attainment, r.replicas_mean, r.decisions)
reqs = got["c"].requests
from collections import Counter
n, mt, mp = Counter(), Counter(), Counter()
for q in reqs:
    b = int(q.arrival // 30); n[b] += 1
    ttft = q.first_t - q.arrival
    tpot = (q.finish_t - q.first_t) / (q.num_out - 1) if q.num_out > 1 else 0
    if ttft > 2.0: mt[b] += 1
    elif tpot > 0.2: mp[b] += 1
for b in sorted(n):
    print(b * 30, n[b], mt[b], mp[b], log.get(b))
