"""The released BWArea import paths (``bwareaModel.model_utils``, ``bwareaModel.tokenizer``), served by bwarea."""
