//! `registry`: Switchyard's service registry (see `app` for the API).

mod app;
mod config;
mod state;
mod store;

use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cfg = config::Config::parse();
    common::telemetry::init_logging();
    common::faults::init("registry");
    anyhow::ensure!(
        cfg.self_preservation_threshold > 0.0 && cfg.self_preservation_threshold <= 1.0,
        "--self-preservation-threshold must be in (0, 1], got {}",
        cfg.self_preservation_threshold
    );
    let instance_id = common::telemetry::instance_id("registry", None);
    let telemetry = common::telemetry::init("registry", &instance_id)?;
    let app = app::App::build(cfg, &telemetry.prometheus).await?;
    tracing::info!(addr = %app.addr()?, "listening");
    let result = app.run(common::shutdown::signal()).await;
    telemetry.shutdown().await;
    result
}
