"""Development tools: a local livekit-server, the worker as a subprocess, `captions up`, WebRTC bots,
`captions speak` and the tiny test checkpoint. The product never imports them."""
