# The image that jobs/kuberay-rayjob.yaml (KubeRay) and jobs/cluster.yaml (Ray cluster launcher)
# run on every node: Ray's CUDA image (built FROM nvidia/cuda, CUDA 12.8 runtime, Python 3.11,
# Ray 2.60 as user `ray`) with this project installed with the `cluster` extra (ray[default]:
# job server, dashboard) and its shipped teachers (teachers/: `pkg:teachers/*.yaml` in configs).
#
#   docker build -t YOUR-REGISTRY/dr-pipeline:0.1.0 .
#   docker run --rm YOUR-REGISTRY/dr-pipeline:0.1.0 dr plan --samples 1.9B --ensemble pkg:teachers/dfndr2b.yaml
#   docker push YOUR-REGISTRY/dr-pipeline:0.1.0
#
# Walk-through from here to a running RayJob: docs/cluster.md "From docker build to a RayJob".
# Keep the Ray version equal to the one pip resolves for the project (pyproject: ray[data,default]).
ARG BASE_IMAGE=rayproject/ray:2.60.0-py311-cu128
FROM ${BASE_IMAGE}

ENV DR_HOME=/home/ray/dr_pipeline \
    PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1
WORKDIR ${DR_HOME}

# The project, its configs and the shipped teachers (17.8 MB of committed checkpoints); .dockerignore
# leaves out .venv, out/, caches and git metadata. An editable install keeps `pkg:` names pointing at
# ${DR_HOME}/teachers, the same files `ray job submit --working-dir .` uploads.
COPY --chown=ray:users . ${DR_HOME}
RUN pip install -e "${DR_HOME}[cluster]"

# Fail the build, not the cluster: the shipped teachers match their checksums, every shipped job
# config loads with its paths resolved (any folder), and the CLI starts.
RUN cd / \
 && dr bootstrap "${DR_HOME}/teachers/synthetic.yaml" --verify \
 && python -c "import glob; from dr_pipeline.config import load_job, load_job_ensemble; \
[load_job_ensemble(load_job(p)) for p in glob.glob('${DR_HOME}/jobs/configs/d*.yaml')]" \
 && dr plan --samples 1M --ensemble pkg:teachers/dfndr2b.yaml > /dev/null

# Optional: bake the papers' teacher weights in (~5 GB) instead of downloading them per node:
#   docker build --build-arg PRELOAD="ViT-L-14:dfn2b_s39b ViT-L-14:dfn2b coca_ViT-L-14:mscoco_finetuned_laion2b_s13b_b90k" ...
ARG PRELOAD=""
RUN for mp in ${PRELOAD}; do \
      python -c "import sys, open_clip; m, p = sys.argv[1].split(':'); open_clip.create_model(m, pretrained=p)" "$mp"; \
    done
