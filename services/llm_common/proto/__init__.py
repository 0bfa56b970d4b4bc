"""The engine API (proto/llm/engine/v1/engine.proto) as both of its sides import it: the
stubs `make proto` generates into `v1/`, and the limits the engine and the gateway share."""

# The largest gRPC message either side of the engine API sends or accepts (gRPC's default
# receive limit is 4 MiB, under what a gateway body of 4 MiB becomes with its framing).
MAX_MESSAGE_BYTES = 64 << 20
# The longest stop string either side accepts (the detokenizer holds back up to a stop
# string's length of text, and searches each one on every token).
MAX_STOP_CHARS = 1024

# The Engine service's full name ("llm.engine.v1.Engine"): health checks and the
# handlers of engines from before a method name it.
ENGINE_SERVICE = "llm.engine.v1.Engine"
