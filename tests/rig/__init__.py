"""The suite's rig: one of each thing the tests need, shared by every module.

fixtures        every fixture and hook (the plugin tests/conftest.py registers)
clock           FakeClock, the one fake clock
waits           until / until_async / until_sync / settle / bounded: bounded polls,
                never fixed sleeps
system          repository paths, free loopback ports, child pids
redis_server    RedisServer (a real redis-server on a free port) and its commandstats
redis_cluster   RedisCluster: a real 3-primary / 3-replica cluster on loopback
redis_sentinel  RedisSentinel: a real primary, replica and 3 sentinels on loopback
redis_nodes     RedisNode, one redis-server process, shared by the two above
engine_fixtures the cluster and sentinel fixtures, and redis_engine (each real engine)
upstream        CountingUpstream (aiohttp) and Seen: the one upstream factory, with
raw_upstream    RawUpstream (byte for byte) and MALFORMED; their fixtures are upstream,
                make_upstream and make_raw_upstream
client          RawClient, read_answer and answers_in, the one raw HTTP client
faults          FaultProxy (a TCP proxy that delays, drops, resets or cuts) and rst()
gateway         the in-process gateway's settings, answers, envelope checks and Load
mock_io         MockTransport and MockLoop: the data plane's protocols without sockets
bucket_model    a pure model of the token bucket (the property test)
loadtest_report the load-test report's documented fields
node_js         the admin page's modules run under node
"""
