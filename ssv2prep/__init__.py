"""ssv2prep: Something-Something-V2 -> WebDataset shards -> TSM training and evaluation."""

__version__ = "0.1.0"
