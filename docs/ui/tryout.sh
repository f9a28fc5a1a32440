#!/bin/bash
# New-user tryout: serve, trigger a run with a changed parameter through the Prefect API, find it in MLflow.
set -u
REPO=${REPO:-$(cd "$(dirname "$0")/../.." && pwd)}
cd $REPO
export PATH=$REPO/.venv/bin:$PATH
ROOT=/tmp/ui/root
rm -rf $ROOT /tmp/ui/shots; mkdir -p /tmp/ui/shots
export PREFECT_HOME=/tmp/ui/prefect_home
(sparsellama serve --port 4200 > /tmp/ui/serve.log 2>&1 &)
for i in $(seq 1 120); do curl -sf http://127.0.0.1:4200/api/health >/dev/null && grep -q "deployments" /tmp/ui/serve.log && break; sleep 1; done
sleep 5
export PREFECT_API_URL=http://127.0.0.1:4200/api
python - <<'PY'
import json, time
from prefect.deployments import run_deployment
run = run_deployment("sparse-llama/default", parameters={
    "profile": "smoke",
    "overrides": ["project.root=/tmp/ui/root", "prune.method=wanda", "pipeline.sparsities=[0.5, 0.7]"]},
    timeout=900)
print("flow run", run.id, run.state.name)
json.dump({"id": str(run.id), "state": run.state.name}, open("/tmp/ui/flow_run.json", "w"))
PY
python - <<'PY'
import json
from mlflow.tracking import MlflowClient
c = MlflowClient(tracking_uri="sqlite:////tmp/ui/root/mlflow.db")
exp = c.get_experiment_by_name("sparsellama")
parent = c.search_runs([exp.experiment_id], "tags.pipeline = 'sparse-llama'")[0]
kids = c.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
p70 = next(r for r in kids if r.data.tags["stage"] == "prune70")
out = {"experiment_id": exp.experiment_id, "parent": parent.info.run_id, "status": parent.info.status,
       "prune.method": parent.data.params["prune.method"], "children": len(kids),
       "prune70": {"run": p70.info.run_id, **{k: p70.data.metrics[k] for k in ("ppl/val", "sparsity/global")}},
       "p50_run": next(r.info.run_id for r in kids if r.data.tags["stage"] == "prune50"),
       "e70": next(r.info.run_id for r in kids if r.data.tags["stage"] == "eval-pretrain70"),
       "e50": next(r.info.run_id for r in kids if r.data.tags["stage"] == "eval-pretrain50")}
print(json.dumps(out, indent=1))
json.dump(out, open("/tmp/ui/mlflow_found.json", "w"))
PY
(mlflow ui --backend-store-uri sqlite:////tmp/ui/root/mlflow.db --host 127.0.0.1 --port 5000 > /tmp/ui/mlflow.log 2>&1 &)
for i in $(seq 1 60); do curl -sf http://127.0.0.1:5000/health >/dev/null && break; sleep 1; done
FR=$(python -c "import json;print(json.load(open('/tmp/ui/flow_run.json'))['id'])")
EXP=$(python -c "import json;print(json.load(open('/tmp/ui/mlflow_found.json'))['experiment_id'])")
PAR=$(python -c "import json;print(json.load(open('/tmp/ui/mlflow_found.json'))['parent'])")
E50=$(python -c "import json;print(json.load(open('/tmp/ui/mlflow_found.json'))['e50'])")
E70=$(python -c "import json;print(json.load(open('/tmp/ui/mlflow_found.json'))['e70'])")
shot() { chromium --headless --no-sandbox --disable-gpu --disable-quic --no-first-run --disable-background-networking \
  --disable-component-update --disable-sync --user-data-dir=/tmp/chr --hide-scrollbars --window-size=1600,1000 \
  --virtual-time-budget=20000 --screenshot=/tmp/ui/shots/$1.png "$2" > /dev/null 2>&1; ls -la /tmp/ui/shots/$1.png; }
shot prefect_deployments "http://127.0.0.1:4200/deployments"
shot prefect_flow_run "http://127.0.0.1:4200/runs/flow-run/$FR"
shot prefect_artifacts "http://127.0.0.1:4200/artifacts"
shot mlflow_runs "http://127.0.0.1:5000/#/experiments/$EXP"
shot mlflow_parent "http://127.0.0.1:5000/#/experiments/$EXP/runs/$PAR"
shot mlflow_compare "http://127.0.0.1:5000/#/compare-runs?runs=%5B%22$E50%22,%22$E70%22%5D&experiments=%5B%22$EXP%22%5D"
pkill -f "mlflow ui" ; pkill -f "sparsellama serve"; pkill -f "prefect server start"
