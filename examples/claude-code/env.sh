# Source this (". examples/claude-code/env.sh") before running `claude` through usage-proxy.
export ANTHROPIC_BASE_URL=http://127.0.0.1:8787        # the proxy (server.public_url)
export ANTHROPIC_API_KEY=sk-demo-alice-0000000000000002  # your usage-proxy key, not an Anthropic key
export CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC=1

# Optional: always continue on extra usage when the included quota runs out, without being asked.
# export ANTHROPIC_CUSTOM_HEADERS="x-extra-usage: continue"
