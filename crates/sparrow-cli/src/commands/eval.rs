//! `sparrow eval`: perplexity, indexer recall, expert routing and long-context
//! retrieval of a model.

use crate::common::{
    held_out, load_model_and_tokenizer, require_corpus, HoldArgs, IndexDtype, DEFAULT_MODEL,
};
use crate::report::Report;
use anyhow::Result;
use clap::Subcommand;
use std::path::PathBuf;

/// The grid shared by the retrieval evaluations.
#[derive(clap::Args)]
pub struct RetrievalGrid {
    /// Model directory.
    #[arg(long, default_value = DEFAULT_MODEL)]
    pub model: PathBuf,
    /// Prompt lengths in tokens.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "1024,2048,4096,8192,16384"
    )]
    pub lengths: Vec<usize>,
    /// Depths of the key in the prompt (0 = start, 1 = just before the question).
    #[arg(long, value_delimiter = ',', default_value = "0,0.25,0.5,0.75,1")]
    pub depths: Vec<f64>,
    /// Prompts per (length, depth) cell.
    #[arg(long, default_value_t = 2)]
    pub trials: usize,
    /// Tokens generated (greedy) after the question.
    #[arg(long, default_value_t = 8)]
    pub max_new_tokens: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Put each prompt in a user turn of the model's chat template (system: "You are a
    /// helpful assistant.") and score the assistant's answer: for instruct models.
    #[arg(long)]
    pub chat: bool,
    /// DSA models: also report, per layer, the share of the key line that the
    /// question's last query selects (one more prefill per prompt).
    #[arg(long)]
    pub key_selection: bool,
    /// DSA models: select this many positions instead of the model's index_topk.
    #[arg(long)]
    pub topk: Option<usize>,
    /// Also draw the accuracy heatmap (length x depth) into this PNG file.
    #[arg(long)]
    pub plot: Option<PathBuf>,
    /// One JSON object (trials, cells, accuracy by length) instead of the table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Subcommand)]
pub enum EvalCmd {
    /// Passkey retrieval (DESIGN.md §8): accuracy by prompt length and key depth.
    Passkey {
        #[command(flatten)]
        grid: RetrievalGrid,
    },
    /// A needle sentence at a given depth of held-out real text; substring-scored.
    Needle {
        #[command(flatten)]
        grid: RetrievalGrid,
        /// Folder of .txt files; the held-out tail of each document is the haystack.
        #[arg(long, default_value = "data/corpus")]
        corpus: PathBuf,
        /// Share of each document held out (the training default).
        #[arg(long, default_value_t = 0.02)]
        val_fraction: f64,
        /// The needle; {value} is replaced by a random 5-digit value per prompt.
        #[arg(long, default_value = sparrow::data::retrieval::DEFAULT_NEEDLE)]
        needle: String,
        /// The question after the haystack; the value should follow it.
        #[arg(long, default_value = sparrow::data::retrieval::DEFAULT_NEEDLE_QUESTION)]
        question: String,
    },
    /// Held-out perplexity at each context length (all positions, and the second half
    /// of each window).
    Perplexity {
        #[arg(long, default_value = DEFAULT_MODEL)]
        model: PathBuf,
        /// Folder of .txt files; the held-out tail of each document is scored.
        #[arg(long, default_value = "data/corpus")]
        corpus: PathBuf,
        /// Context lengths.
        #[arg(long, value_delimiter = ',', default_value = "1024")]
        context: Vec<usize>,
        /// Windows per context length (evenly spaced over the held-out text).
        #[arg(long, default_value_t = 8)]
        windows: usize,
        #[arg(long, default_value_t = 0.02)]
        val_fraction: f64,
        /// Allow contexts past the model's max_position_embeddings (RoPE extrapolation:
        /// what the model does beyond the length it was trained at).
        #[arg(long)]
        lift_context_limit: bool,
        /// DSA models: select this many positions instead of the model's index_topk.
        #[arg(long)]
        topk: Option<usize>,
        /// Score each window through the engine's chunked prefill, this many tokens per
        /// step (the KV cache as in generation: memory of a chunk plus the cache, for
        /// long windows), instead of one whole-window forward.
        #[arg(long)]
        prefill_chunk: Option<usize>,
        #[arg(long)]
        json: bool,
    },
    /// Share of dense attention mass the DSA indexer's top-k keeps, per layer.
    Recall {
        /// Model directory.
        #[arg(long, default_value = DEFAULT_MODEL)]
        model: PathBuf,
        /// Folder of .txt files; the held-out tail of each document is used.
        #[arg(long, default_value = "data/corpus")]
        corpus: PathBuf,
        /// Tokens of context per window.
        #[arg(long, default_value_t = 4096)]
        context: usize,
        /// Windows to average over.
        #[arg(long, default_value_t = 4)]
        windows: usize,
        /// Select this many positions instead of the model's index_topk; a list
        /// (`64,128,256`) measures each (the recall-vs-k curve).
        #[arg(long, value_delimiter = ',')]
        topk: Vec<usize>,
        /// Keep the index keys in this precision instead of the model's index_cache_dtype.
        #[arg(long, value_enum)]
        index_dtype: Option<IndexDtype>,
        /// Share of each document held out (the training default).
        #[arg(long, default_value_t = 0.02)]
        val_fraction: f64,
        #[arg(long)]
        json: bool,
    },
    /// Expert utilization per MoE layer on a corpus, router frozen: MaxVio, CV,
    /// normalised entropy, drop rate (capacity limits applied), dead experts.
    Routing {
        /// Model directory.
        #[arg(long, default_value = DEFAULT_MODEL)]
        model: PathBuf,
        /// Folder of .txt files.
        #[arg(long, default_value = "data/corpus")]
        corpus: PathBuf,
        /// Share of each document used (its tail; 0.02 = the training runs' validation
        /// split; 1 = whole documents, e.g. for out-of-distribution text).
        #[arg(long, default_value_t = 0.02)]
        val_fraction: f64,
        /// Tokens per window.
        #[arg(long, default_value_t = 256)]
        seq_len: usize,
        /// Windows (evenly spaced over the text).
        #[arg(long, default_value_t = 128)]
        windows: usize,
        /// Windows per forward (the capacity limits are per batch).
        #[arg(long, default_value_t = 16)]
        batch_size: usize,
        #[arg(long)]
        json: bool,
    },
}

impl RetrievalGrid {
    /// The model and tokenizer, with `--topk` applied.
    fn load(&self) -> Result<(sparrow::model::Model, sparrow::tokenizer::Tokenizer)> {
        crate::common::load_model_edited(&self.model, HoldArgs::default(), |c| {
            if let Some(k) = self.topk {
                c.index_topk = k;
            }
        })
    }

    fn options(&self) -> sparrow::eval::retrieval::RetrievalOptions {
        sparrow::eval::retrieval::RetrievalOptions {
            lengths: self.lengths.clone(),
            depths: self.depths.clone(),
            trials: self.trials,
            max_new_tokens: self.max_new_tokens,
            seed: self.seed,
            chat: self.chat,
            key_selection: self.key_selection,
        }
    }
}

fn print_retrieval(
    grid: &RetrievalGrid,
    report: &sparrow::eval::retrieval::RetrievalReport,
) -> Result<()> {
    if let Some(p) = &grid.plot {
        let title = format!(
            "{} accuracy of {} ({} trials per cell)",
            report.task.name(),
            grid.model.display(),
            grid.trials
        );
        sparrow::eval::heatmap::plot_heatmap(p, &title, report)?;
    }
    if grid.json {
        println!("{}", serde_json::to_string(report)?);
    } else {
        println!(
            "{} accuracy of {} ({} trials per cell, greedy, {} new tokens)",
            report.task.name(),
            grid.model.display(),
            grid.trials,
            grid.max_new_tokens
        );
        print!("{}", sparrow::eval::retrieval::format_table(report));
        if grid.key_selection {
            let by_layer = sparrow::eval::retrieval::key_selected_by_layer(&report.trials);
            let cells: Vec<String> = by_layer
                .iter()
                .enumerate()
                .map(|(l, share)| match share {
                    Some(v) => format!("{l}:{:.0}%", v * 100.0),
                    None => format!("{l}:all"),
                })
                .collect();
            println!(
                "key line selected by the question's last query, per layer (mean; all = attended every position): {}",
                cells.join(" ")
            );
        }
        if let Some(p) = &grid.plot {
            println!("heatmap written to {}", p.display());
        }
    }
    Ok(())
}

pub fn run(cmd: EvalCmd, progress: bool) -> Result<()> {
    match cmd {
        EvalCmd::Passkey { grid } => {
            let (m, tok) = grid.load()?;
            let report = sparrow::eval::retrieval::passkey(&m, &tok, &grid.options(), progress)?;
            print_retrieval(&grid, &report)?;
        }
        EvalCmd::Needle {
            grid,
            corpus,
            val_fraction,
            needle,
            question,
        } => {
            require_corpus(&corpus)?;
            let (m, tok) = grid.load()?;
            let hay = held_out(&corpus, &tok, val_fraction, progress)?;
            let report = sparrow::eval::retrieval::needle(
                &m,
                &tok,
                &hay,
                &needle,
                &question,
                &grid.options(),
                progress,
            )?;
            print_retrieval(&grid, &report)?;
        }
        EvalCmd::Perplexity {
            model,
            corpus,
            context,
            windows,
            val_fraction,
            lift_context_limit,
            topk,
            prefill_chunk,
            json,
        } => {
            require_corpus(&corpus)?;
            let longest = context.iter().copied().max().unwrap_or(0);
            let (m, tok) = crate::common::load_model_edited(&model, HoldArgs::default(), |c| {
                if lift_context_limit {
                    c.max_position_embeddings = c.max_position_embeddings.max(longest);
                }
                if let Some(k) = topk {
                    c.index_topk = k;
                }
            })?;
            let tokens = held_out(&corpus, &tok, val_fraction, progress)?;
            let scoring = match prefill_chunk {
                Some(n) => sparrow::eval::perplexity::Scoring::Prefill(n),
                None => sparrow::eval::perplexity::Scoring::Window,
            };
            let rows = sparrow::eval::perplexity::measure(
                &m, &tokens, &context, windows, scoring, progress,
            )?;
            let mut report = Report::new(json)
                .col(
                    "context",
                    8,
                    |r: &sparrow::eval::perplexity::ContextPerplexity| r.context.to_string(),
                )
                .col("windows", 8, |r| r.windows.to_string())
                .col("loss", 8, |r| format!("{:.4}", r.loss))
                .col("perplexity", 11, |r| format!("{:.3}", r.perplexity))
                .col("ppl 2nd ½", 10, |r| {
                    format!("{:.3}", r.perplexity_second_half)
                });
            report.note(format!(
                "held-out perplexity of {} on {} ({windows} windows per context)",
                model.display(),
                corpus.display()
            ));
            report.rows(&rows)?;
        }
        EvalCmd::Routing {
            model,
            corpus,
            val_fraction,
            seq_len,
            windows,
            batch_size,
            json,
        } => {
            let (m, tok) = load_model_and_tokenizer(&model)?;
            let tokens = held_out(&corpus, &tok, val_fraction, progress)?;
            let rows = sparrow::eval::routing::measure(
                &m, &tokens, seq_len, windows, batch_size, progress,
            )?;
            let mut report = Report::new(json)
                .col("layer", 5, |r: &sparrow::eval::routing::LayerRouting| {
                    r.layer.to_string()
                })
                .col("tokens", 8, |r| r.utilization.tokens.to_string())
                .col("MaxVio", 8, |r| format!("{:.3}", r.utilization.max_vio))
                .col("CV", 7, |r| format!("{:.3}", r.utilization.cv))
                .col("entropy", 8, |r| format!("{:.4}", r.utilization.entropy))
                .col("drop", 7, |r| {
                    format!("{:.2}%", r.utilization.drop_rate * 100.0)
                })
                .col("dead", 5, |r| r.utilization.dead.to_string())
                .col("demandVio", 10, |r| {
                    format!("{:.3}", r.utilization.demand_max_vio)
                });
            report.note(format!(
                "expert utilization of {} ({}) on {} ({} windows of {seq_len} tokens, batches of {batch_size})",
                model.display(),
                m.cfg.router_kind.name(),
                corpus.display(),
                windows
            ));
            report.rows(&rows)?;
        }
        EvalCmd::Recall {
            model,
            corpus,
            context,
            windows,
            topk,
            index_dtype,
            val_fraction,
            json,
        } => {
            let source = sparrow::model_source::resolve(&model, progress)?;
            let tok = sparrow::model_source::load_tokenizer(&source)?;
            let tokens =
                sparrow::eval::recall::held_out_tokens(&corpus, &tok, val_fraction, progress)?;
            let ks: Vec<Option<usize>> = if topk.is_empty() {
                vec![None]
            } else {
                topk.iter().map(|&k| Some(k)).collect()
            };
            let mut rows = Vec::new();
            for k in ks {
                let m = sparrow::model_source::load_model_for_inference(
                    &source,
                    sparrow::weights::WeightFormat::F32,
                    candle_core::DType::F32,
                    &candle_core::Device::Cpu,
                    |c| {
                        if let Some(k) = k {
                            c.index_topk = k;
                        }
                        if let Some(d) = index_dtype {
                            c.index_cache_dtype = d.into();
                        }
                    },
                )?;
                rows.extend(sparrow::eval::recall::measure(
                    &m, &tokens, context, windows, progress,
                )?);
            }
            let mut report = Report::new(json)
                .col("layer", 5, |r: &sparrow::eval::recall::LayerRecall| {
                    r.layer.to_string()
                })
                .col("top-k", 6, |r| r.topk.to_string())
                .col("queries", 8, |r| r.queries.to_string())
                .col("mean", 7, |r| format!("{:.4}", r.mean))
                .col("p5", 7, |r| format!("{:.4}", r.p5))
                .col("min", 7, |r| format!("{:.4}", r.min))
                .col("best", 7, |r| format!("{:.4}", r.best_mean));
            report.note(format!(
                "indexer recall of {} at context {context} (queries in the last quarter of {windows} windows)",
                model.display()
            ));
            report.rows(&rows)?;
        }
    }
    Ok(())
}
