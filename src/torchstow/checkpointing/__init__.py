"""The URI-taking engines: checkpointers, barriers, the writer process, the async save
pipeline, replication."""
