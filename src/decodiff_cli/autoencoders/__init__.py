"""Frozen autoencoders behind one interface (see ``base.Autoencoder``)."""

from decodiff_cli.autoencoders.base import Autoencoder, AutoencoderUnavailable

__all__ = ["Autoencoder", "AutoencoderUnavailable"]
