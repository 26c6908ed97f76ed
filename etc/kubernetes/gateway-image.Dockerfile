# egateway's own image, for the Deployment in etc/kubernetes/egateway.yaml: the package with its kubernetes client,
# running as uid 1000 (the Deployment's securityContext), kernelspecs in /opt/egateway/kernelspecs (the
# Deployment's EG_KERNELSPEC_PATH; mount a ConfigMap there to replace them). The tests build the same layout without
# Docker (tests/test_kubernetes_deploy.py: the checkout and the Python environment mounted from the host).
#
# From the repository root:  docker build -f etc/kubernetes/gateway-image.Dockerfile -t egateway:latest .
FROM python:3.11-slim
COPY . /opt/egateway/src
RUN pip install --no-cache-dir /opt/egateway/src \
    && mkdir -p /opt/egateway/kernelspecs \
    && cp -r /opt/egateway/src/etc/kernelspecs/python_kubernetes /opt/egateway/kernelspecs/ \
    && useradd --uid 1000 --gid 100 --home-dir /var/lib/egateway --create-home egateway
USER 1000:100
EXPOSE 8888 8877
CMD ["twistd", "--nodaemon", "--pidfile=", "egateway", "--listen=tcp:8888"]
