//! The service through a real server (in process or the built binary) on loopback: the API
//! edge, jobs rendered by workers with the tiny models, the queue, API keys, webhooks,
//! restarts and the load test.

mod support;

mod api {
    mod connections;
    mod hardening;
    mod keys_and_webhooks;
    mod observability;
    mod openapi;
    mod readme;
    mod requests;
}
mod batch;
mod jobs;
mod keys;
mod load;
mod multinode;
mod queue;
mod restarts;
mod serve;
mod steer;
mod storage_api;
mod storage_backends;
mod submit_parses;
mod video;
mod webhooks;
