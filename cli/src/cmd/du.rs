use clap::Args;
use strata_fs::gc::mark::{Owner, RootOptions};
use strata_fs::gc::retention::Policy;
use strata_fs::gc::usage::{self, Prices, Tally};

use crate::units::human;
use crate::GlobalArgs;

#[derive(Args)]
pub struct DuArgs {
    /// Store URL.
    store: String,
    /// Only this dataset (NAME) or volume (SCOPE/NAME) in the table of who keeps what.
    name: Option<String>,
    #[arg(long)]
    json: bool,
    /// Dollars per GB stored per month, for the cost estimate.
    #[arg(long, default_value_t = Prices::default().per_gb_month)]
    price_gb_month: f64,
    /// Dollars per 1,000 PUT requests.
    #[arg(long, default_value_t = Prices::default().per_1000_puts)]
    price_put: f64,
    /// Dollars per 1,000 GET requests.
    #[arg(long, default_value_t = Prices::default().per_1000_gets)]
    price_get: f64,
    /// As `strata gc --grace`: the layers a tag left within this long are kept whatever its
    /// retention.
    #[arg(long, default_value = "1h", value_parser = crate::units::parse_duration)]
    grace: std::time::Duration,
    /// As `strata gc --keep-history`, for datasets without a policy of their own.
    #[arg(long, value_name = "N")]
    keep_history: Option<u32>,
    /// As `strata gc --keep-within`, for datasets without a policy of their own.
    #[arg(long, value_name = "DURATION", value_parser = crate::units::parse_duration)]
    keep_within: Option<std::time::Duration>,
    /// As `strata gc --keep-replaced`.
    #[arg(long, default_value = "7d", value_parser = crate::units::parse_duration)]
    keep_replaced: std::time::Duration,
}

pub async fn run(g: &GlobalArgs, a: DuArgs) -> anyhow::Result<()> {
    for (flag, price) in [
        ("--price-gb-month", a.price_gb_month),
        ("--price-put", a.price_put),
        ("--price-get", a.price_get),
    ] {
        if !price.is_finite() || price < 0.0 {
            anyhow::bail!("{flag} must be a price of 0 or more, not {price}");
        }
    }
    let store = super::open_store(g, &a.store).await?;
    let prices = Prices {
        per_gb_month: a.price_gb_month,
        per_1000_puts: a.price_put,
        per_1000_gets: a.price_get,
    };
    let roots = RootOptions {
        grace: a.grace,
        default_policy: (a.keep_history.is_some() || a.keep_within.is_some())
            .then(|| Policy::new(a.keep_history, a.keep_within.map(|d| d.as_secs()))),
        keep_replaced: a.keep_replaced,
        ..RootOptions::default()
    };
    let mut u = usage::usage(&store, prices, &roots).await?;
    if let Some(name) = &a.name {
        u.owners.retain(|o| match &o.owner {
            Owner::Dataset(n) | Owner::Volume(n) => n == name,
            Owner::Mount(_) | Owner::Recent => false,
        });
        if u.owners.is_empty() {
            anyhow::bail!(
                "nothing in {} is kept alive by a dataset or volume {name}",
                a.store
            );
        }
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&u)?);
        return Ok(());
    }
    let tally = |t: &Tally| format!("{} objects, {}", t.objects, human(t.bytes));
    println!("{}: {}", u.store, tally(&u.total));
    for (kind, t) in &u.by_kind {
        println!("  {kind:<14} {:>9} {:>10}", t.objects, human(t.bytes));
    }
    println!();
    println!(
        "{:<32} {:>6} {:>11} {:>11} {:>11}",
        "kept alive by", "layers", "referenced", "unique", "shared"
    );
    for o in &u.owners {
        println!(
            "{:<32} {:>6} {:>11} {:>11} {:>11}",
            o.owner.to_string(),
            o.layers,
            human(o.referenced),
            human(o.unique),
            human(o.shared)
        );
    }
    println!("(stored bytes of the chunks their layers use; unique: what removing it frees)");
    println!();
    let d = &u.dead;
    println!(
        "dead (nothing keeps it alive): packs {}; layers {}; locators {}; start records {}; forwarding maps {}",
        tally(&d.packs),
        tally(&d.layers),
        tally(&d.locators),
        tally(&d.start_records),
        tally(&d.forwarding_maps)
    );
    println!(
        "  deleting them frees {}; {} more sit unused in live packs (gc frees those of packs mostly dead by rewriting them)",
        human(d.freeable),
        human(d.in_live_packs)
    );
    let c = &u.cost;
    println!();
    println!(
        "cost at ${}/GB-month, ${}/1,000 PUTs, ${}/1,000 GETs: storage ${:.4}/month (${:.4} of it dead); \
         the PUTs that wrote it ${:.4}; reading every live byte once ${:.4} of GETs",
        c.prices.per_gb_month,
        c.prices.per_1000_puts,
        c.prices.per_1000_gets,
        c.storage_per_month,
        c.dead_per_month,
        c.puts_to_write,
        c.gets_to_read_all
    );
    if !u.problems.is_empty() {
        eprintln!();
        eprintln!("strata: some roots or layers could not be read, so some of what looks dead may not be:");
        for p in &u.problems {
            eprintln!("  {p}");
        }
    }
    Ok(())
}
