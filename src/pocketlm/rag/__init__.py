"""Retrieval over a folder of documents: loaders, chunking, embeddings, store, answers."""
