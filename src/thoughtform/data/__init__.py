"""Datasets of voiced replies: validate, normalise, convert, measure and synthesise them."""
