"""The caption viewer's server: the static page in web/, signed viewer links and viewer tokens."""
