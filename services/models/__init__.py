"""Pretrained models: the catalog of packaged models and the importer that makes servable HF folders."""
