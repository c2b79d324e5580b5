# One image for every streamcrawl service: `streamcrawl run <stage>`, a stage of services/registry.py.
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    STREAMCRAWL_METRICS_PORT=9400

WORKDIR /app
COPY . /app
RUN pip install --no-cache-dir . \
    && groupadd --system --gid 10001 streamcrawl \
    && useradd --system --uid 10001 --gid 10001 --home-dir /tmp --shell /usr/sbin/nologin streamcrawl \
    && install -d -o 10001 -g 10001 /var/lib/streamcrawl/warc
# (a named volume mounted there starts with this owner: the warc stage writes its files)

USER 10001:10001
EXPOSE 9400
ENTRYPOINT ["streamcrawl"]
CMD ["--help"]
