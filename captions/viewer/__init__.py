"""The caption viewer's server: the static page in web/, signed viewer links, each room's captions
relayed to its viewers, and the backlog."""
