# One image for every role: the producer API, the workers and the one-shot migration.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY worker ./worker
COPY producer ./producer
RUN pip install --no-cache-dir '.[postgres]' && useradd --system --no-create-home appattest
USER appattest
EXPOSE 8000
CMD ["appattest", "--help"]
