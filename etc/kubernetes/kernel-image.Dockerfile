# A kernel image for egateway's Kubernetes launcher, usable with Enterprise Gateway's pod templates too: its entry
# point, launchers/bootstrap/bootstrap-kernel.sh, takes Enterprise Gateway's environment contract (KERNEL_ID,
# RESPONSE_ADDRESS, PUBLIC_KEY, PORT_RANGE, KERNEL_LANGUAGE, ...) and egateway's launch token, and starts
# launchers/python/launch_ipykernel.py. The tests build the same layout without Docker (tests/fixtures/kubecluster.py).
#
# From the repository root:  docker build -f etc/kubernetes/kernel-image.Dockerfile -t egateway-kernel-py .
FROM python:3.11-slim
RUN pip install --no-cache-dir "ipykernel>=6.29" "jupyter_client>=8" "cryptography>=42"
COPY launchers/bootstrap/bootstrap-kernel.sh /usr/local/bin/bootstrap-kernel.sh
COPY launchers/python/launch_ipykernel.py /usr/local/bin/kernel-launchers/python/launch_ipykernel.py
ENV KERNEL_LANGUAGE=python
RUN useradd --uid 1000 --gid 100 --create-home jovyan
USER 1000:100
WORKDIR /home/jovyan
ENTRYPOINT ["/bin/bash", "/usr/local/bin/bootstrap-kernel.sh"]
