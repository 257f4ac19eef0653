"""Models: CheXEnc encoder registry, task heads and the MultiCheXNet composition."""
