"""Mirrors modules/images.py: resize_image(resize_mode, im, width, height)."""


def resize_image(resize_mode, im, width, height, upscaler_name=None):
    return im.resize((width, height))
