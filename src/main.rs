use clap::Parser;

// Allocation is ~8% of server CPU per CreateCertificate with the system allocator (BENCHMARKS.md §4).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
use meshd::config::{Cli, Command, LogArgs, LogFormat, ServeArgs};

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("meshd: cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(async move {
        match cli.command.unwrap_or_else(|| Command::Serve(Box::default())) {
            Command::Serve(args) => {
                meshd::logging::init(&args.log);
                serve(*args).await
            }
            Command::Token(args) => meshd::auth::issuer::LocalIssuer::load_or_create(&args.data_dir)
                .map_err(anyhow::Error::from)
                .and_then(|issuer| {
                    Ok(issuer.mint(
                        &args.namespace,
                        &args.service_account,
                        &args.audience,
                        args.ttl,
                        std::time::SystemTime::now(),
                    )?)
                })
                .map(|token| println!("{token}")),
            Command::Cert(args) => {
                meshd::logging::init(&quiet_logs());
                meshd::client::run(*args).await
            }
            Command::Bench(cmd) => {
                meshd::logging::init(&quiet_logs());
                meshd::bench::run(cmd).await
            }
            Command::CreateRemoteSecret(args) => {
                meshd::logging::init(&quiet_logs());
                meshd::remote_secret::run(*args).await
            }
            Command::ProxyStatus(args) => {
                meshd::logging::init(&quiet_logs());
                meshd::proxy_status::run(args).await
            }
        }
    });
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("meshd: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn quiet_logs() -> LogArgs {
    LogArgs {
        log_level: "warn".into(),
        log_format: LogFormat::Text,
    }
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let meshd = meshd::app::start(args).await?;
    tracing::info!(root_cert = %meshd.root_cert_path().display(), "meshd is serving");
    meshd.run_until_signal().await
}
