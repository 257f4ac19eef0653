"""Task heads over CheXEnc features."""
