# sagan on a CUDA machine. Build: docker build -t sagan .
# Run: see README, "Docker" (GPUs, shared memory, user, and the data and output folders to mount).
# The base image brings Python, CUDA, cuDNN, NCCL, torch and torchvision; another tag: --build-arg BASE_IMAGE=...
ARG BASE_IMAGE=pytorch/pytorch:2.11.0-cuda12.8-cudnn9-runtime
FROM ${BASE_IMAGE}

# Logs straight to `docker logs`; no pip cache in the image.
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# The project and its other dependencies (hydra-core, wandb, torch-fidelity, pillow). The base image's torch and
# torchvision are pinned as constraints: pip fails rather than swap them for another build. Not editable: the image
# holds a fixed copy of the code. The import checks that the entry point and its dependencies load.
WORKDIR /opt/sagan
COPY pyproject.toml README.md ./
COPY conf/ conf/
COPY sagan/ sagan/
RUN { pip freeze | grep -E '^(torch|torchvision)==' || true; } > /tmp/base-torch.txt \
    && pip install --constraint /tmp/base-torch.txt . \
    && python -c "import sagan.train, torch_fidelity, wandb"

# A home that any user can write to (`docker run --user $(id -u):$(id -g)` keeps output files yours): W&B settings,
# the FID Inception weights and cached reference statistics go under it (mount a volume on /home/sagan/.cache to
# keep them between containers).
ENV HOME=/home/sagan
RUN mkdir -p /home/sagan/.cache /work/outputs && chmod -R 1777 /home/sagan /work

# Runs write to /work/outputs/<date>/<time> (mount it); datasets are read from where data.root points (mount them,
# e.g. on /data).
WORKDIR /work
ENTRYPOINT ["sagan-train"]
CMD ["--help"]
