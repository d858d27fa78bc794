"""vpnd benchmarks: throughput/latency against OpenVPN and wireguard-go, and a scale bench."""
