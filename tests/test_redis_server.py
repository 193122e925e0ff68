"""The test harness's own redis-server: it answers, and an acknowledged write survives kill -9."""


def test_session_server_answers_and_is_emptied_per_test(redis_server, redis_url):
    with redis_server.client() as client:
        assert client.dbsize() == 0
        client.set("tinymq-test", "1")
        assert client.config_get("maxmemory-policy") == {"maxmemory-policy": "noeviction"}


def test_acknowledged_write_survives_kill_9(own_redis_server):
    with own_redis_server.client() as client:
        client.rpush("acknowledged", *range(100))
    own_redis_server.restart()
    with own_redis_server.client() as client:
        assert client.llen("acknowledged") == 100
