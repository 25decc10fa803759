//! The page (UI thread): state as Leptos signals, actions that talk to the model worker,
//! and the view. Nothing here touches the model; pictures are drawn on canvases from
//! the logits the worker returns, so threshold and opacity update without rerunning.

use std::cell::RefCell;
use std::sync::Arc;

use image::RgbImage;
use js_sys::{Array, ArrayBuffer, Float32Array, Uint8Array};
use leptos::prelude::*;
use leptos::task::spawn_local;
use vlsm::Logits;
use vlsm::clinical::{ClinicalImage, Slice};
use vlsm::mask_check::{BORDERLINE_MARGIN, MaskCheck};
use vlsm::nifti::Plane;
use vlsm::prompts::PromptAttributes;
use vlsm::share::{ClinicalView, ImageSource, ShareState, ViewSettings};
use vlsm::window::{PRESETS, Window};
use wasm_bindgen::prelude::*;
use wasm_bindgen::{Clamped, JsCast};
use wasm_bindgen_futures::JsFuture;
use web_sys::{HtmlCanvasElement, MessageEvent, Worker};

use crate::js::{describe, pack, to_buffer, unpack};
use crate::logic::{self, LinkRecord, MaskSummary, PromptResult};
use crate::protocol::{Backend, FromWorker, ToWorker};

/// Images the page ships (made by `tools/make_examples.py`, CC0), with a matching prompt.
const EXAMPLES: [(&str, &str, &str); 2] = [
    ("examples/synthetic_polyp.png", "synthetic polyp", "polyp"),
    (
        "examples/synthetic_lesion.png",
        "synthetic skin lesion",
        "skin melanoma",
    ),
];

/// A decoded image and what the page needs of it.
pub struct ImageState {
    pub name: String,
    /// The file as given (or a link's PNG), sent to the worker as it is; `None` for a
    /// picture rendered from a DICOM file or NIfTI volume, encoded when the model runs.
    pub bytes: Option<Vec<u8>>,
    pub rgb: RgbImage,
    /// The image at view size, for the overlay canvas.
    pub view: RgbImage,
    pub sha256: String,
    /// Where it came from, when that was a URL (examples, links).
    pub url: Option<String>,
    /// When it is a picture of a DICOM file or NIfTI volume: which, and its window.
    pub clinical: Option<ClinicalView>,
}

/// A dropped DICOM file or NIfTI volume, kept (in this tab only) to browse its pictures.
pub struct ClinicalSource {
    pub name: String,
    pub file: ClinicalImage,
}

pub struct Truth {
    pub name: String,
    pub width: u32,
    pub height: u32,
    pub mask: Vec<u8>,
    /// A label file (DICOM or NIfTI): the mask follows the image's slice.
    pub source: Option<Arc<ClinicalSource>>,
}

#[derive(Clone, PartialEq)]
pub struct LoadedInfo {
    pub url: String,
    pub backend: Backend,
    pub device: String,
    pub note: Option<String>,
    pub sha256: String,
    pub bytes: u64,
    pub dtype: String,
    pub from_cache: bool,
    pub download_ms: f64,
    pub load_ms: f64,
    pub wasm_memory_bytes: u64,
    /// The model family, as the link names it.
    pub model: String,
}

#[derive(Clone, PartialEq)]
pub enum ModelState {
    None,
    Loading { url: String },
    Loaded(LoadedInfo),
    Failed { message: String },
}

#[derive(Clone, PartialEq)]
pub struct Progress {
    pub file: String,
    pub done: u64,
    pub total: Option<u64>,
    pub bytes_per_s: f64,
    pub from_cache: bool,
}

pub struct RunResults {
    pub results: Vec<PromptResult>,
    pub width: u32,
    pub height: u32,
    pub encode_ms: f64,
    pub decode_ms: f64,
    pub backend: Backend,
}

#[derive(Clone, Copy, PartialEq)]
pub enum RunState {
    Idle,
    Running,
    Done,
    Failed,
}

/// What a link asked for that can only be checked later.
#[derive(Clone, PartialEq)]
struct Pending {
    weights_sha256: Option<String>,
    image_sha256: String,
    /// The picture of a DICOM file or NIfTI volume the link shows, applied when the user
    /// drops that file.
    clinical: Option<ClinicalView>,
    run: bool,
}

/// All page state. Signals are `Copy`, so the whole page is too.
#[derive(Clone, Copy)]
pub struct Page {
    backend: RwSignal<Backend>,
    weights_input: RwSignal<String>,
    model: RwSignal<ModelState>,
    progress: RwSignal<Option<Progress>>,
    worker_status: RwSignal<String>,
    image: RwSignal<Option<Arc<ImageState>>>,
    /// The DICOM file or NIfTI volume the image is a picture of (which picture: the
    /// image's `clinical`).
    clinical: RwSignal<Option<Arc<ClinicalSource>>>,
    truth: RwSignal<Option<Arc<Truth>>>,
    prompts: RwSignal<Vec<String>>,
    attrs: RwSignal<PromptAttributes>,
    threshold: RwSignal<f32>,
    opacity: RwSignal<f32>,
    selected: RwSignal<usize>,
    results: RwSignal<Option<Arc<RunResults>>>,
    run: RwSignal<RunState>,
    running_prompts: RwSignal<Vec<String>>,
    error: RwSignal<Option<String>>,
    info: RwSignal<Option<String>>,
    share_link: RwSignal<Option<String>>,
    pending: RwSignal<Option<Pending>>,
    /// The masks the opened link recorded, to compare the page's with.
    link_record: RwSignal<Option<Arc<LinkRecord>>>,
}

thread_local! {
    static WORKER: RefCell<Option<Worker>> = const { RefCell::new(None) };
    /// Messages sent before the worker's wasm announced itself (they would be lost).
    static QUEUE: RefCell<Option<Vec<(Array, Array)>>> = const { RefCell::new(Some(Vec::new())) };
}

pub fn start() {
    leptos::mount::mount_to_body(App);
}

#[component]
fn App() -> impl IntoView {
    let page = Page {
        backend: RwSignal::new(initial_backend()),
        weights_input: RwSignal::new(logic::DEFAULT_WEIGHTS_URL.to_string()),
        model: RwSignal::new(ModelState::None),
        progress: RwSignal::new(None),
        worker_status: RwSignal::new("starting the model worker".into()),
        image: RwSignal::new(None),
        clinical: RwSignal::new(None),
        truth: RwSignal::new(None),
        prompts: RwSignal::new(vec!["polyp".into()]),
        attrs: RwSignal::new(PromptAttributes {
            class: "polyp".into(),
            ..Default::default()
        }),
        threshold: RwSignal::new(0.5),
        opacity: RwSignal::new(0.5),
        selected: RwSignal::new(0),
        results: RwSignal::new(None),
        run: RwSignal::new(RunState::Idle),
        running_prompts: RwSignal::new(Vec::new()),
        error: RwSignal::new(None),
        info: RwSignal::new(None),
        share_link: RwSignal::new(None),
        pending: RwSignal::new(None),
        link_record: RwSignal::new(None),
    };
    page.spawn_worker();
    let hash = window().location().hash().unwrap_or_default();
    if !hash.is_empty() {
        page.apply_link(&hash);
    }
    let _ = window_event_listener(leptos::ev::hashchange, move |_| {
        let hash = window().location().hash().unwrap_or_default();
        if !hash.is_empty() {
            page.apply_link(&hash);
        }
    });
    let _ = window_event_listener(leptos::ev::paste, move |ev: web_sys::ClipboardEvent| {
        let file = ev
            .clipboard_data()
            .and_then(|d| d.files())
            .and_then(|f| f.get(0));
        if let Some(file) = file {
            ev.prevent_default();
            page.read_image_file(file);
        }
    });
    view! {
        <header>
            <h1>"vlsm"</h1>
            <p class="tagline">
                "Text-prompted medical image segmentation (CLIPSeg) that runs in your browser. "
                "Your image never leaves this machine."
            </p>
        </header>
        <main
            data-model=move || match page.model.get() {
                ModelState::None => "none",
                ModelState::Loading { .. } => "loading",
                ModelState::Loaded(_) => "loaded",
                ModelState::Failed { .. } => "failed",
            }
            data-run=move || match page.run.get() {
                RunState::Idle => "idle",
                RunState::Running => "running",
                RunState::Done => "done",
                RunState::Failed => "failed",
            }
        >
            <Messages page=page />
            <div class="columns">
                <div class="controls">
                    <ModelPanel page=page />
                    <ImagePanel page=page />
                    <PromptPanel page=page />
                </div>
                <div class="output">
                    <ResultsPanel page=page />
                </div>
            </div>
        </main>
        <footer>
            "CLIPSeg (Lüddecke & Ecker, CVPR 2022) as evaluated in medvlsm (Poudel et al., MIDL 2024). "
            "Research software, not a medical device."
        </footer>
    }
}

/// `?backend=cpu|webgpu|auto` picks the starting backend (handy for tests and slow GPUs).
fn initial_backend() -> Backend {
    let search = window().location().search().unwrap_or_default();
    search
        .trim_start_matches('?')
        .split('&')
        .find_map(|kv| kv.strip_prefix("backend="))
        .and_then(Backend::parse)
        .unwrap_or(Backend::Auto)
}

impl Page {
    fn fail(self, message: impl Into<String>) {
        self.error.set(Some(message.into()));
    }

    fn spawn_worker(self) {
        QUEUE.with(|q| *q.borrow_mut() = Some(Vec::new()));
        match create_worker(self) {
            Ok(worker) => WORKER.with(|w| *w.borrow_mut() = Some(worker)),
            Err(e) => self.fail(format!("the model worker could not start: {e}")),
        }
    }

    fn send(self, message: ToWorker, buffers: Vec<ArrayBuffer>) -> bool {
        let (msg, transfer) = pack(&message.to_json(), buffers);
        let queued = QUEUE.with(|q| match q.borrow_mut().as_mut() {
            Some(queue) => {
                queue.push((msg.clone(), transfer.clone()));
                true
            }
            None => false,
        });
        if queued {
            return true;
        }
        let sent = WORKER.with(|w| {
            w.borrow()
                .as_ref()
                .map(|w| w.post_message_with_transfer(&msg, &transfer).is_ok())
        });
        if sent != Some(true) {
            self.fail("the model worker is not running: reload the page");
            return false;
        }
        true
    }

    fn load_model(self) {
        self.error.set(None);
        let url = match logic::normalize_weights_url(&self.weights_input.get_untracked()) {
            Ok(url) => url,
            Err(e) => {
                self.model.set(ModelState::Failed { message: e.clone() });
                return self.fail(e);
            }
        };
        self.weights_input.set(url.clone());
        self.progress.set(None);
        self.model.set(ModelState::Loading { url: url.clone() });
        self.send(
            ToWorker::Load {
                url,
                backend: self.backend.get_untracked(),
            },
            Vec::new(),
        );
    }

    fn segment(self) {
        self.error.set(None);
        let Some(image) = self.image.get_untracked() else {
            return self.fail("choose an image first (drop, paste or pick one)");
        };
        if !matches!(self.model.get_untracked(), ModelState::Loaded(_)) {
            return self.fail("load a model first");
        }
        let prompts = self.prompts.get_untracked();
        if let Err(e) = logic::check_prompts(&prompts) {
            return self.fail(e);
        }
        let bytes = match &image.bytes {
            Some(bytes) => to_buffer(bytes),
            None => match vlsm::render::encode_png(&image.rgb) {
                Ok(png) => to_buffer(&png),
                Err(e) => return self.fail(e.to_string()),
            },
        };
        self.running_prompts.set(prompts.clone());
        self.run.set(RunState::Running);
        self.send(ToWorker::Segment { prompts }, vec![bytes]);
    }

    fn on_worker(self, message: FromWorker, buffers: Vec<ArrayBuffer>) {
        match message {
            FromWorker::Ready => {
                self.worker_status.set("ready".into());
                let queued = QUEUE.with(|q| q.borrow_mut().take()).unwrap_or_default();
                WORKER.with(|w| {
                    if let Some(w) = w.borrow().as_ref() {
                        for (msg, transfer) in queued {
                            let _ = w.post_message_with_transfer(&msg, &transfer);
                        }
                    }
                });
            }
            FromWorker::Status { text } => self.worker_status.set(text),
            FromWorker::Progress {
                file,
                done,
                total,
                bytes_per_s,
                from_cache,
            } => self.progress.set(Some(Progress {
                file,
                done,
                total,
                bytes_per_s,
                from_cache,
            })),
            FromWorker::Loaded {
                backend,
                device,
                note,
                weights_sha256,
                weights_bytes,
                dtype,
                from_cache,
                download_ms,
                load_ms,
                wasm_memory_bytes,
                model,
                ..
            } => {
                let url = match self.model.get_untracked() {
                    ModelState::Loading { url } => url,
                    _ => self.weights_input.get_untracked(),
                };
                self.worker_status.set("ready".into());
                // The study's threshold for this family (0.35 for CRIS), unless a link
                // being restored sets its own.
                if self.pending.get_untracked().is_none()
                    && let Some(arch) = vlsm::model::Arch::from_name(&model)
                {
                    self.threshold.set(arch.default_threshold());
                }
                self.model.set(ModelState::Loaded(LoadedInfo {
                    url,
                    backend,
                    device,
                    note,
                    sha256: weights_sha256.clone(),
                    bytes: weights_bytes,
                    dtype,
                    from_cache,
                    download_ms,
                    load_ms,
                    wasm_memory_bytes,
                    model,
                }));
                if let Some(pending) = self.pending.get_untracked()
                    && let Some(expected) = &pending.weights_sha256
                    && *expected != weights_sha256
                {
                    self.info.set(Some(format!(
                        "The weights at this URL differ from the link's: sha256 {} here, {} in \
                         the link. Results may differ from what was shared.",
                        short(&weights_sha256),
                        short(expected)
                    )));
                }
                self.maybe_run_pending();
            }
            FromWorker::Segmented {
                width,
                height,
                size,
                encode_ms,
                decode_ms,
                truncated,
            } => {
                let prompts = self.running_prompts.get_untracked();
                if buffers.len() != prompts.len() {
                    self.run.set(RunState::Failed);
                    return self.fail("the worker returned the wrong number of masks");
                }
                let results = prompts
                    .into_iter()
                    .zip(buffers)
                    .enumerate()
                    .map(|(i, (prompt, buffer))| PromptResult {
                        prompt,
                        logits: Logits {
                            size,
                            values: Float32Array::new(&buffer).to_vec(),
                        },
                        truncated: truncated.get(i).copied().unwrap_or(false),
                    })
                    .collect::<Vec<_>>();
                let backend = match self.model.get_untracked() {
                    ModelState::Loaded(info) => info.backend,
                    _ => Backend::Cpu,
                };
                if self.selected.get_untracked() >= results.len() {
                    self.selected.set(0);
                }
                self.results.set(Some(Arc::new(RunResults {
                    results,
                    width,
                    height,
                    encode_ms,
                    decode_ms,
                    backend,
                })));
                self.run.set(RunState::Done);
                self.worker_status.set("ready".into());
            }
            FromWorker::Error { message } => {
                if matches!(self.model.get_untracked(), ModelState::Loading { .. }) {
                    self.model.set(ModelState::Failed {
                        message: message.clone(),
                    });
                }
                if self.run.get_untracked() == RunState::Running {
                    self.run.set(RunState::Failed);
                }
                self.worker_status.set("ready".into());
                self.fail(message);
            }
            FromWorker::Crashed { message } => {
                WORKER.with(|w| {
                    if let Some(w) = w.borrow_mut().take() {
                        w.terminate();
                    }
                });
                self.model.set(ModelState::Failed {
                    message: message.clone(),
                });
                if self.run.get_untracked() == RunState::Running {
                    self.run.set(RunState::Failed);
                }
                self.fail(format!("{message} — restarted it; load the model again"));
                self.spawn_worker();
            }
        }
    }

    /// Reads a dropped, pasted or picked image file.
    fn read_image_file(self, file: web_sys::File) {
        if let Err(e) = logic::check_clinical_file_size(file.size()) {
            return self.fail(format!("{}: {e}", file.name()));
        }
        spawn_local(async move {
            match JsFuture::from(file.array_buffer()).await {
                Ok(buffer) => {
                    let bytes = Uint8Array::new(&buffer).to_vec();
                    if vlsm::clinical::sniff(&bytes).is_some() {
                        self.set_clinical(file.name(), &bytes);
                    } else {
                        self.set_image(file.name(), bytes, None, None);
                    }
                }
                Err(e) => self.fail(format!("cannot read {}: {}", file.name(), describe(&e))),
            }
        });
    }

    fn read_truth_file(self, file: web_sys::File) {
        if let Err(e) = logic::check_clinical_file_size(file.size()) {
            return self.fail(format!("{}: {e}", file.name()));
        }
        spawn_local(async move {
            let bytes = match JsFuture::from(file.array_buffer()).await {
                Ok(buffer) => Uint8Array::new(&buffer).to_vec(),
                Err(e) => {
                    return self.fail(format!("cannot read {}: {}", file.name(), describe(&e)));
                }
            };
            if vlsm::clinical::sniff(&bytes).is_some() {
                return match logic::read_clinical(&bytes) {
                    Ok(label) => self.set_truth_source(Arc::new(ClinicalSource {
                        name: file.name(),
                        file: label,
                    })),
                    Err(e) => self.fail(format!("{}: {e}", file.name())),
                };
            }
            match logic::check_image_size(&bytes)
                .and_then(|_| vlsm::preprocess::decode_mask(&bytes))
            {
                Ok((width, height, mask)) => {
                    if let Some(img) = self.image.get_untracked()
                        && (img.rgb.width(), img.rgb.height()) != (width, height)
                    {
                        return self.fail(format!(
                            "the mask {} is {width}×{height} but the image is {}×{}",
                            file.name(),
                            img.rgb.width(),
                            img.rgb.height()
                        ));
                    }
                    self.error.set(None);
                    self.truth.set(Some(Arc::new(Truth {
                        name: file.name(),
                        width,
                        height,
                        mask,
                        source: None,
                    })));
                }
                Err(e) => self.fail(format!("{}: {e}", file.name())),
            }
        });
    }

    /// Decodes and shows an image (`clinical`: the picture of a DICOM file or NIfTI volume a
    /// link says it is); results of the previous image are cleared.
    fn set_image(
        self,
        name: String,
        bytes: Vec<u8>,
        url: Option<String>,
        clinical: Option<ClinicalView>,
    ) {
        let decoded =
            logic::check_image_size(&bytes).and_then(|_| vlsm::preprocess::decode_rgb(&bytes));
        let rgb = match decoded {
            Ok(rgb) => rgb,
            Err(e) => return self.fail(format!("{name}: {e}")),
        };
        self.clinical.set(None);
        self.show_image(name, Some(bytes), rgb, url, clinical);
    }

    /// Parses a dropped DICOM file or NIfTI volume and shows its first picture (or the one
    /// an opened link names).
    fn set_clinical(self, name: String, bytes: &[u8]) {
        let file = match logic::read_clinical(bytes) {
            Ok(file) => file,
            Err(e) => return self.fail(format!("{name}: {e}")),
        };
        // An opened link still to be reproduced names the picture.
        let from_link = self
            .pending
            .get_untracked()
            .filter(|p| p.run)
            .and_then(|p| p.clinical);
        let view = match from_link {
            Some(view) => match file.check(view.slice) {
                Ok(()) => view,
                Err(e) => {
                    self.fail(format!("{name}: the link's {e}"));
                    return;
                }
            },
            None => ClinicalView {
                slice: file.default_slice(),
                window: Window::File,
            },
        };
        self.clinical
            .set(Some(Arc::new(ClinicalSource { name, file })));
        self.set_view(view);
    }

    /// Shows a picture of the dropped DICOM file or NIfTI volume (a slice, plane or
    /// window chosen); the image keeps its view.
    fn set_view(self, view: ClinicalView) {
        let Some(source) = self.clinical.get_untracked() else {
            return;
        };
        let view = ClinicalView {
            window: logic::effective_window(&source.file, view.window),
            ..view
        };
        match source.file.render(view.slice, view.window) {
            Ok(rgb) => {
                self.show_image(source.name.clone(), None, rgb, None, Some(view));
                self.refresh_truth();
            }
            Err(e) => self.fail(format!("{}: {e}", source.name)),
        }
    }

    /// A label file as the ground truth: its picture at the image's slice.
    fn set_truth_source(self, source: Arc<ClinicalSource>) {
        let slice = self
            .image
            .get_untracked()
            .and_then(|i| i.clinical)
            .map(|v| v.slice)
            .filter(|s| source.file.check(*s).is_ok())
            .unwrap_or_else(|| source.file.default_slice());
        match self.truth_at(&source, slice) {
            Ok(truth) => {
                self.error.set(None);
                self.truth.set(Some(Arc::new(truth)));
            }
            Err(e) => self.fail(e),
        }
    }

    /// After the image's slice changed: a label file's mask follows it.
    fn refresh_truth(self) {
        let Some(source) = self.truth.get_untracked().and_then(|t| t.source.clone()) else {
            return;
        };
        let Some(view) = self.image.get_untracked().and_then(|i| i.clinical) else {
            return;
        };
        match self.truth_at(&source, view.slice) {
            Ok(truth) => self.truth.set(Some(Arc::new(truth))),
            Err(e) => {
                self.truth.set(None);
                self.fail(e);
            }
        }
    }

    fn truth_at(self, source: &Arc<ClinicalSource>, slice: Slice) -> Result<Truth, String> {
        let (width, height, mask) = source
            .file
            .label_mask(slice)
            .map_err(|e| format!("{}: {e}", source.name))?;
        if let Some(img) = self.image.get_untracked()
            && (img.rgb.width(), img.rgb.height()) != (width, height)
        {
            return Err(format!(
                "the mask {} is {width}×{height} but the image is {}×{}",
                source.name,
                img.rgb.width(),
                img.rgb.height()
            ));
        }
        Ok(Truth {
            name: format!("{} ({slice})", source.name),
            width,
            height,
            mask,
            source: Some(source.clone()),
        })
    }

    /// Shows a decoded image; results of the previous image are cleared.
    fn show_image(
        self,
        name: String,
        bytes: Option<Vec<u8>>,
        rgb: RgbImage,
        url: Option<String>,
        clinical: Option<ClinicalView>,
    ) {
        let (vw, vh) = logic::fit(rgb.width(), rgb.height(), logic::VIEW_SIDE);
        let view = vlsm::preprocess::resize_bilinear_pil(&rgb, vw, vh);
        let sha256 = vlsm::share::pixels_sha256(&rgb);
        if let Some(pending) = self.pending.get_untracked()
            && pending.image_sha256 != sha256
        {
            self.info.set(Some(format!(
                "This image differs from the link's (pixel sha256 {} vs {}).",
                short(&sha256),
                short(&pending.image_sha256)
            )));
        }
        if let Some(t) = self.truth.get_untracked()
            && (t.width, t.height) != (rgb.width(), rgb.height())
        {
            self.truth.set(None);
        }
        self.error.set(None);
        self.results.set(None);
        self.run.set(RunState::Idle);
        self.share_link.set(None);
        self.image.set(Some(Arc::new(ImageState {
            name,
            bytes,
            rgb,
            view,
            sha256,
            url,
            clinical,
        })));
        self.maybe_run_pending();
    }

    fn load_image_url(self, url: String, name: String) {
        spawn_local(async move {
            match fetch_bytes(&url).await {
                Ok(bytes) => self.set_image(name, bytes, Some(url), None),
                Err(e) => self.fail(format!("cannot load the image {url}: {e}")),
            }
        });
    }

    /// Restores the page from a share link's fragment and reruns once model and image are in.
    fn apply_link(self, fragment: &str) {
        let state = match ShareState::from_link(fragment) {
            Ok(state) => state,
            Err(e) => return self.fail(format!("this page's {e}")),
        };
        self.weights_input.set(state.weights_url.clone());
        self.prompts.set(state.prompts.clone());
        self.threshold.set(state.threshold);
        self.opacity.set(state.view.opacity);
        self.selected.set(state.view.selected);
        self.link_record.set(LinkRecord::of(&state).map(Arc::new));
        self.pending.set(Some(Pending {
            weights_sha256: state.weights_sha256.clone(),
            image_sha256: state.image_sha256.clone(),
            clinical: state.clinical,
            run: true,
        }));
        let picture = state.clinical.map(|c| {
            format!(
                "{} {} with window {}",
                if c.slice.plane.is_some() {
                    "slice"
                } else {
                    "frame"
                },
                c.slice,
                c.window
            )
        });
        match (state.image, picture) {
            (ImageSource::Embedded { name, png }, picture) => {
                self.set_image(name.clone(), png, None, state.clinical);
                if let Some(picture) = picture {
                    self.info.set(Some(format!(
                        "This image is {picture} of {name}; drop that file here to browse its \
                         other slices."
                    )));
                }
            }
            (ImageSource::Url { name, url }, _) => self.load_image_url(url, name),
            (ImageSource::Omitted { name }, Some(picture)) => self.info.set(Some(format!(
                "This link shows {picture} of {name}, which does not travel in links: drop \
                 that file here to reproduce the result (the picture is checked against the \
                 link's hash)."
            ))),
            (ImageSource::Omitted { name }, None) => self.info.set(Some(format!(
                "This link's image ({name}) was too large to travel in it: drop the original \
                 image here to reproduce the result (it is checked against the link's hash)."
            ))),
        }
        let same_model = matches!(self.model.get_untracked(),
            ModelState::Loaded(ref info) if info.url == state.weights_url);
        if same_model {
            self.maybe_run_pending();
        } else {
            self.load_model();
        }
    }

    fn maybe_run_pending(self) {
        let ready = matches!(self.model.get_untracked(), ModelState::Loaded(_))
            && self.image.get_untracked().is_some()
            && self.run.get_untracked() != RunState::Running;
        if ready
            && let Some(pending) = self.pending.get_untracked()
            && pending.run
        {
            self.pending.set(Some(Pending {
                run: false,
                ..pending
            }));
            self.segment();
        }
    }

    /// Builds the link for the current state and copies it to the clipboard.
    fn share(self) {
        let Some(image) = self.image.get_untracked() else {
            return self.fail("choose an image first");
        };
        let threshold = self.threshold.get_untracked();
        // The masks as shown, so whoever opens the link sees whether theirs match.
        let (prompts, masks) = match self.results.get_untracked() {
            Some(r) => (
                r.results.iter().map(|p| p.prompt.clone()).collect(),
                r.results
                    .iter()
                    .map(|p| MaskCheck::of(&p.logits, threshold, r.width, r.height))
                    .collect(),
            ),
            None => (self.prompts.get_untracked(), Vec::new()),
        };
        let (weights_url, weights_sha256, model) = match self.model.get_untracked() {
            ModelState::Loaded(info) => (
                info.url,
                Some(info.sha256).filter(|s| s.len() == 64),
                Some(info.model),
            ),
            _ => match logic::normalize_weights_url(&self.weights_input.get_untracked()) {
                Ok(url) => (url, None, None),
                Err(e) => return self.fail(e),
            },
        };
        let mut note = None;
        let source = match &image.url {
            Some(url) => ImageSource::Url {
                name: image.name.clone(),
                url: url.clone(),
            },
            None => match vlsm::share::embeddable_png(&image.rgb) {
                Ok(Some(png)) => ImageSource::Embedded {
                    name: image.name.clone(),
                    png,
                },
                Ok(None) => {
                    note = Some(
                        "The image is too large to travel in a link: whoever opens it must drop \
                         the same image (it is checked by hash)."
                            .to_string(),
                    );
                    ImageSource::Omitted {
                        name: image.name.clone(),
                    }
                }
                Err(e) => return self.fail(e.to_string()),
            },
        };
        let state = ShareState {
            weights_url,
            weights_sha256,
            model,
            prompts,
            threshold,
            view: ViewSettings {
                opacity: self.opacity.get_untracked(),
                selected: self.selected.get_untracked(),
            },
            image: source,
            image_sha256: image.sha256.clone(),
            masks,
            margin: BORDERLINE_MARGIN,
            clinical: image.clinical,
        };
        let page_url = window().location().href().unwrap_or_default();
        match state.to_link(&page_url) {
            Ok(link) => {
                let clipboard = window().navigator().clipboard();
                let _ = clipboard.write_text(&link);
                self.share_link.set(Some(link));
                self.info.set(note);
            }
            Err(e) => self.fail(e.to_string()),
        }
    }
}

fn short(sha: &str) -> String {
    sha.chars().take(16).collect()
}

/// An image from a URL: capped at [`vlsm::limits::MAX_IMAGE_BYTES`], given up when stalled.
async fn fetch_bytes(url: &str) -> Result<Vec<u8>, String> {
    let response = crate::js::fetch_within(window().fetch_with_str(url), url).await?;
    if !response.ok() {
        return Err(format!("HTTP {}", response.status()));
    }
    let expected = crate::js::content_length(&response);
    crate::js::read_body(
        &response,
        expected,
        vlsm::limits::MAX_IMAGE_BYTES,
        None,
        |_, _| {},
    )
    .await
}

/// Starts the worker from a `blob:` script, so it inherits this page's CSP.
fn create_worker(page: Page) -> Result<Worker, String> {
    let base = document()
        .base_uri()
        .ok()
        .flatten()
        .unwrap_or_else(|| window().location().href().unwrap_or_default());
    let resolve = |file: &str| {
        web_sys::Url::new_with_base(file, &base)
            .map(|u| u.href())
            .map_err(|e| describe(&e))
    };
    let script = format!(
        "importScripts({:?});wasm_bindgen({{module_or_path: {:?}}});",
        resolve("vlsm-worker.js")?,
        resolve("vlsm-worker_bg.wasm")?
    );
    let options = web_sys::BlobPropertyBag::new();
    options.set_type("text/javascript");
    let blob =
        web_sys::Blob::new_with_str_sequence_and_options(&Array::of1(&script.into()), &options)
            .map_err(|e| describe(&e))?;
    let url = web_sys::Url::create_object_url_with_blob(&blob).map_err(|e| describe(&e))?;
    let worker = Worker::new(&url).map_err(|e| describe(&e))?;
    let on_message =
        Closure::<dyn FnMut(MessageEvent)>::new(move |ev: MessageEvent| {
            match unpack(&ev.data())
                .and_then(|(json, buffers)| Ok((FromWorker::from_json(&json)?, buffers)))
            {
                Ok((message, buffers)) => page.on_worker(message, buffers),
                Err(e) => page.fail(e),
            }
        });
    worker.set_onmessage(Some(on_message.as_ref().unchecked_ref()));
    on_message.forget();
    let on_error =
        Closure::<dyn FnMut(web_sys::ErrorEvent)>::new(move |ev: web_sys::ErrorEvent| {
            page.fail(format!("the model worker failed: {}", ev.message()));
            page.worker_status.set("failed".into());
        });
    worker.set_onerror(Some(on_error.as_ref().unchecked_ref()));
    on_error.forget();
    Ok(worker)
}

fn draw(canvas: &HtmlCanvasElement, width: u32, height: u32, rgba: &[u8]) {
    canvas.set_width(width);
    canvas.set_height(height);
    let Some(ctx) = canvas
        .get_context("2d")
        .ok()
        .flatten()
        .and_then(|c| c.dyn_into::<web_sys::CanvasRenderingContext2d>().ok())
    else {
        return;
    };
    if let Ok(data) =
        web_sys::ImageData::new_with_u8_clamped_array_and_sh(Clamped(rgba), width, height)
    {
        let _ = ctx.put_image_data(&data, 0.0, 0.0);
    }
}

fn download(name: &str, mime: &str, bytes: &[u8]) {
    let options = web_sys::BlobPropertyBag::new();
    options.set_type(mime);
    let parts = Array::of1(&Uint8Array::from(bytes));
    let Ok(blob) = web_sys::Blob::new_with_u8_array_sequence_and_options(&parts, &options) else {
        return;
    };
    let Ok(url) = web_sys::Url::create_object_url_with_blob(&blob) else {
        return;
    };
    if let Ok(a) = document().create_element("a")
        && let Ok(a) = a.dyn_into::<web_sys::HtmlAnchorElement>()
    {
        a.set_href(&url);
        a.set_download(name);
        a.click();
    }
    let _ = web_sys::Url::revoke_object_url(&url);
}

fn first_file(ev: &web_sys::Event) -> Option<web_sys::File> {
    let input: web_sys::HtmlInputElement = event_target(ev);
    let file = input.files().and_then(|f| f.get(0));
    input.set_value("");
    file
}

#[component]
fn Messages(page: Page) -> impl IntoView {
    view! {
        {move || page.error.get().map(|e| view! { <p class="error" role="alert" id="error">{e}</p> })}
        {move || page.info.get().map(|i| view! { <p class="info" id="info">{i}</p> })}
    }
}

#[component]
fn ModelPanel(page: Page) -> impl IntoView {
    let busy = move || matches!(page.model.get(), ModelState::Loading { .. });
    view! {
        <section class="panel" id="model">
            <h2>"1 · Model"</h2>
            <label for="weights-url">"Weights (Hugging Face model id or folder URL)"</label>
            <div class="row">
                <input id="weights-url" type="text" spellcheck="false"
                    prop:value=move || page.weights_input.get()
                    on:input=move |ev| page.weights_input.set(event_target_value(&ev)) />
                <button id="load" on:click=move |_| page.load_model() disabled=busy>
                    {move || if matches!(page.model.get(), ModelState::Failed { .. }) { "Retry" } else { "Load" }}
                </button>
            </div>
            <p class="hint">"CLIPSeg: any Hugging Face CLIPSeg folder with model.safetensors. \
                BiomedCLIPSeg / BiomedCLIPSeg-D: a folder written by vlsm convert or vlsm train \
                (BiomedCLIP's hub repo is a PyTorch pickle, which the page does not read). \
                CRIS: a folder written by vlsm convert from cris.pt or medvlsm's best.ckpt. \
                The model family is read from its config.json; the threshold starts at the \
                study's for it (0.35 for CRIS, 0.5 otherwise)."</p>
            <label for="backend">"Run on"</label>
            <select id="backend"
                on:change=move |ev| {
                    if let Some(b) = Backend::parse(&event_target_value(&ev)) {
                        page.backend.set(b);
                        if matches!(page.model.get_untracked(), ModelState::Loaded(_)) {
                            page.load_model();
                        }
                    }
                }>
                <option value="auto" selected=move || page.backend.get() == Backend::Auto>"Auto (WebGPU if available)"</option>
                <option value="webgpu" selected=move || page.backend.get() == Backend::WebGpu>"WebGPU"</option>
                <option value="cpu" selected=move || page.backend.get() == Backend::Cpu>"CPU"</option>
            </select>
            {move || page.progress.get().filter(|_| busy()).map(|p| {
                let fraction = p.total.map(|t| p.done as f64 / t.max(1) as f64);
                let total = p.total.map(|t| format!(" of {}", logic::human_bytes(t as f64))).unwrap_or_default();
                view! {
                    <div class="progress">
                        <progress max="1" value=fraction.unwrap_or(0.0)></progress>
                        <span>
                            {format!("{} {}{}{} · {}/s", if p.from_cache { "reading" } else { "downloading" },
                                p.file, ": ", logic::human_bytes(p.done as f64), logic::human_bytes(p.bytes_per_s))}
                            {total}
                        </span>
                    </div>
                }
            })}
            <p class="status" id="model-status">{move || match page.model.get() {
                ModelState::None => "No model loaded.".to_string(),
                ModelState::Loading { url } => format!("Loading {url} — {}", page.worker_status.get()),
                ModelState::Failed { message } => format!("Failed: {message}"),
                ModelState::Loaded(info) => format!(
                    "{} loaded on {} · {} {} ({} in {:.0} ms), built in {:.0} ms · worker memory {}",
                    vlsm::model::Arch::from_name(&info.model).map_or("Model", |a| a.display_name()),
                    info.device,
                    logic::human_bytes(info.bytes as f64),
                    info.dtype,
                    if info.from_cache { "from the browser cache" } else { "downloaded" },
                    info.download_ms,
                    info.load_ms,
                    logic::human_bytes(info.wasm_memory_bytes as f64)
                ),
            }}</p>
            {move || match page.model.get() {
                ModelState::Loaded(info) => Some(view! {
                    <p class="sha">"weights sha256 " <code id="weights-sha256">{info.sha256.clone()}</code></p>
                    <p class="backend" id="backend-used" data-backend=info.backend.label()>{
                        format!("Backend: {}", info.backend.label())
                    }</p>
                    {info.note.map(|n| view! { <p class="info" id="backend-note">{n}</p> })}
                }),
                _ => None,
            }}
        </section>
    }
}

#[component]
fn ImagePanel(page: Page) -> impl IntoView {
    let on_drop = move |ev: web_sys::DragEvent| {
        ev.prevent_default();
        if let Some(file) = ev
            .data_transfer()
            .and_then(|d| d.files())
            .and_then(|f| f.get(0))
        {
            page.read_image_file(file);
        }
    };
    view! {
        <section class="panel" id="image">
            <h2>"2 · Image"</h2>
            <div class="drop" on:dragover=|ev: web_sys::DragEvent| ev.prevent_default() on:drop=on_drop>
                "Drop an image, a DICOM file or a NIfTI volume here, paste one, or "
                <label class="pick">"pick a file"
                    <input id="image-file" type="file" accept="image/png,image/jpeg,image/webp,image/bmp,image/tiff,application/dicom,.dcm,.nii,.nii.gz,.gz"
                        on:change=move |ev| { if let Some(f) = first_file(&ev) { page.read_image_file(f) } } />
                </label>
                "."
            </div>
            <p class="examples">"Examples: "
                {EXAMPLES.iter().map(|&(path, label, class)| view! {
                    <button class="link" on:click=move |_| {
                        let url = web_sys::Url::new_with_base(path, &document().base_uri().ok().flatten().unwrap_or_default())
                            .map(|u| u.href()).unwrap_or_else(|_| path.to_string());
                        page.attrs.update(|a| a.class = class.to_string());
                        page.load_image_url(url, path.rsplit('/').next().unwrap_or(path).to_string());
                    }>{label}</button>
                }).collect_view()}
            </p>
            {move || page.image.get().map(|img| view! {
                <p class="status" id="image-status" data-sha256=img.sha256.clone()>
                    {format!("{} · {}×{}", img.name, img.rgb.width(), img.rgb.height())}
                    {img.clinical.map(|c| format!(" · {} · window {}", c.slice, c.window))}
                </p>
            })}
            {move || page.clinical.get().map(|source| view! { <ClinicalControls page=page source=source /> })}
            <label>"Ground-truth mask (optional, for live Dice/IoU; a label volume follows the slice) "
                <input id="truth-file" type="file" accept="image/*,application/dicom,.dcm,.nii,.nii.gz,.gz"
                    on:change=move |ev| { if let Some(f) = first_file(&ev) { page.read_truth_file(f) } } />
            </label>
            {move || page.truth.get().map(|t| view! {
                <p class="status" id="truth-status">{format!("mask {} · {}×{}", t.name, t.width, t.height)}
                    " " <button class="link" on:click=move |_| page.truth.set(None)>"remove"</button>
                </p>
            })}
        </section>
    }
}

/// Slice (or frame), plane and window of a dropped DICOM file or NIfTI volume. Disabled
/// while the model runs, so results always belong to the picture shown.
#[component]
fn ClinicalControls(page: Page, source: Arc<ClinicalSource>) -> impl IntoView {
    let running = move || page.run.get() == RunState::Running;
    let current = move || page.image.with(|i| i.as_ref().and_then(|i| i.clinical));
    let file = &source.file;
    let is_volume = file.nifti().is_some();
    let greyscale = file.is_greyscale();
    let file_window = file.file_window();
    // Pictures per plane (an array, so the closures below stay `Copy`).
    let counts: [(Option<Plane>, usize); 3] = if is_volume {
        [Plane::Axial, Plane::Coronal, Plane::Sagittal].map(|p| (Some(p), file.count(Some(p))))
    } else {
        [(None, file.count(None)); 3]
    };
    let count_of =
        move |plane: Option<Plane>| counts.iter().find(|c| c.0 == plane).map_or(1, |c| c.1);
    let multi = is_volume || file.count(None) > 1;
    let describe = {
        let source = source.clone();
        move || current().map(|v| logic::describe_slice(&source.file, v.slice))
    };
    let set_index = move |ev: web_sys::Event| {
        if let (Ok(k), Some(v)) = (event_target_value(&ev).parse::<usize>(), current()) {
            let k = k.min(count_of(v.slice.plane).saturating_sub(1));
            if k != v.slice.index {
                page.set_view(ClinicalView {
                    slice: Slice {
                        index: k,
                        ..v.slice
                    },
                    ..v
                });
            }
        }
    };
    let set_plane = move |ev: web_sys::Event| {
        if let (Ok(plane), Some(v)) = (event_target_value(&ev).parse::<Plane>(), current()) {
            page.set_view(ClinicalView {
                slice: Slice {
                    plane: Some(plane),
                    index: count_of(Some(plane)) / 2,
                },
                ..v
            });
        }
    };
    let set_window = move |text: String| match text.parse::<Window>() {
        Ok(window) => {
            if let Some(v) = current() {
                page.set_view(ClinicalView { window, ..v });
            }
        }
        Err(e) => page.fail(format!("window {e}")),
    };
    // The preset a window is, for the menu ("custom" when none).
    let preset = move || {
        current().map_or("file".to_string(), |v| match v.window {
            Window::File => "file".into(),
            Window::MinMax => "minmax".into(),
            Window::Explicit { center, width } => PRESETS
                .iter()
                .find(|p| p.1 == center && p.2 == width)
                .map_or("custom".into(), |p| p.0.to_string()),
        })
    };
    view! {
        <div class="clinical" id="clinical"
            data-slice=move || current().map(|v| v.slice.to_string())
            data-window=move || current().map(|v| v.window.to_string())>
            <p class="status" id="slice-status">{describe}</p>
            {is_volume.then(|| view! {
                <label>"plane "
                    <select id="plane" disabled=running on:change=set_plane
                        prop:value=move || current().and_then(|v| v.slice.plane).map_or("axial", Plane::name)>
                        <option value="axial">"axial"</option>
                        <option value="coronal">"coronal"</option>
                        <option value="sagittal">"sagittal"</option>
                    </select>
                </label>
            })}
            {multi.then(|| view! {
                <label>{if is_volume { "slice " } else { "frame " }}
                    <input id="slice" type="range" min="0" disabled=running
                        max=move || current().map_or(0, |v| count_of(v.slice.plane).saturating_sub(1))
                        prop:value=move || current().map_or(0, |v| v.slice.index).to_string()
                        on:input=set_index />
                </label>
            })}
            {greyscale.then(|| view! {
                <label>"window "
                    <select id="window-preset" disabled=running prop:value=preset
                        on:change=move |ev| {
                            let v = event_target_value(&ev);
                            if v != "custom" { set_window(v) }
                        }>
                        {if is_volume {
                            view! { <option value="file">"full range"</option> }.into_any()
                        } else {
                            view! { <option value="file">{match file_window {
                                Some((c, w)) => format!("the file's ({c}, {w})"),
                                None => "the file's (none: full range)".to_string(),
                            }}</option> }.into_any()
                        }}
                        <option value="minmax">"this picture's range"</option>
                        {PRESETS.iter().map(|&(name, c, w)| view! {
                            <option value=name>{format!("{name} ({c}, {w})")}</option>
                        }).collect_view()}
                        <option value="custom">"custom"</option>
                    </select>
                    <input id="window" type="text" spellcheck="false" disabled=running
                        title="CENTER,WIDTH (e.g. 40,400), file, minmax or a preset"
                        prop:value=move || current().map(|v| v.window.to_string()).unwrap_or_default()
                        on:change=move |ev| set_window(event_target_value(&ev)) />
                </label>
            })}
        </div>
    }
}

#[component]
fn PromptPanel(page: Page) -> impl IntoView {
    let attr_input = move |label: &'static str,
                           id: &'static str,
                           get: fn(&PromptAttributes) -> String,
                           set: fn(&mut PromptAttributes, String)| {
        view! {
            <label>{label}
                <input id=id type="text" prop:value=move || page.attrs.with(get)
                    on:input=move |ev| { let v = event_target_value(&ev); page.attrs.update(|a| set(a, v)) } />
            </label>
        }
    };
    view! {
        <section class="panel" id="prompts">
            <h2>"3 · Prompts"</h2>
            <ol class="prompt-list">
                {move || (0..page.prompts.with(Vec::len)).map(|i| view! {
                    <li>
                        <input type="text" class="prompt" spellcheck="false"
                            prop:value=move || page.prompts.with(|p| p.get(i).cloned().unwrap_or_default())
                            on:input=move |ev| { let v = event_target_value(&ev); page.prompts.update(|p| if let Some(x) = p.get_mut(i) { *x = v }) } />
                        <button class="link" title="remove" on:click=move |_| page.prompts.update(|p| { if i < p.len() { p.remove(i); } })>"×"</button>
                    </li>
                }).collect_view()}
            </ol>
            <div class="row">
                <button id="add-prompt" disabled=move || { page.prompts.with(Vec::len) >= vlsm::share::MAX_PROMPTS }
                    on:click=move |_| page.prompts.update(|p| p.push(String::new()))>"+ prompt"</button>
                <button id="run" class="primary"
                    disabled=move || page.run.get() == RunState::Running || !matches!(page.model.get(), ModelState::Loaded(_))
                    on:click=move |_| page.segment()>"Segment"</button>
            </div>
            <details>
                <summary>"Build P1–P6 prompts (medvlsm templates)"</summary>
                <div class="attrs">
                    {attr_input("class", "attr-class", |a| a.class.clone(), |a, v| a.class = v)}
                    {attr_input("shape", "attr-shape", |a| a.shape.clone(), |a, v| a.shape = v)}
                    {attr_input("colour", "attr-color", |a| a.color.clone(), |a, v| a.color = v)}
                    {attr_input("size", "attr-size", |a| a.size.clone(), |a, v| a.size = v)}
                    {attr_input("number", "attr-number", |a| a.number.clone(), |a, v| a.number = v)}
                    {attr_input("location", "attr-location", |a| a.location.clone(), |a, v| a.location = v)}
                </div>
                <p class="hint">"Sizes: tiny, small, medium, large. Numbers in words (one, two). Locations: top left, center, bottom right … Empty attributes are left out."</p>
                <button id="fill-presets" on:click=move |_| page.prompts.set(page.attrs.with(PromptAttributes::presets))>"Fill P1–P6"</button>
            </details>
        </section>
    }
}

#[component]
fn ResultsPanel(page: Page) -> impl IntoView {
    // Full-size masks, fingerprints and scores for the current threshold.
    let summaries = Memo::new(move |_| {
        let threshold = page.threshold.get();
        let truth = page.truth.get();
        let link = page.link_record.get();
        let image_sha = page.image.with(|i| i.as_ref().map(|i| i.sha256.clone()));
        page.results.get().map(|run| {
            let prompts: Vec<&str> = run.results.iter().map(|r| r.prompt.as_str()).collect();
            run.results
                .iter()
                .enumerate()
                .map(|(i, r)| {
                    let t = truth.as_ref().map(|t| t.mask.as_slice());
                    let mut summary = logic::summarize(r, threshold, run.width, run.height, t).1;
                    summary.agreement =
                        link.as_ref()
                            .zip(image_sha.as_deref())
                            .and_then(|(link, sha)| {
                                let size = (run.width, run.height);
                                link.agreement(&prompts, i, &r.logits, threshold, size, sha)
                            });
                    summary
                })
                .collect::<Vec<MaskSummary>>()
        })
    });
    let view_canvas = NodeRef::<leptos::html::Canvas>::new();
    Effect::new(move |_| {
        let Some(canvas) = view_canvas.get() else {
            return;
        };
        let Some(image) = page.image.get() else {
            return;
        };
        let (w, h) = image.view.dimensions();
        let selected = page.selected.get();
        let opacity = page.opacity.get();
        let threshold = page.threshold.get();
        let rgba = page.results.with(|run| {
            let mask = run
                .as_ref()
                .and_then(|run| run.results.get(selected))
                .map(|r| r.logits.mask_at(threshold, w, h));
            logic::overlay_rgba(
                &image.view,
                mask.as_deref(),
                logic::prompt_color(selected),
                opacity,
            )
        });
        draw(&canvas, w, h, &rgba);
    });
    view! {
        <section class="panel" id="results">
            <h2>"4 · Masks"</h2>
            <div class="sliders">
                <label>{move || format!("threshold {:.2}", page.threshold.get())}
                    <input id="threshold" type="range" min="0" max="1" step="0.01"
                        prop:value=move || page.threshold.get().to_string()
                        on:input=move |ev| { if let Ok(v) = event_target_value(&ev).parse::<f32>() { page.threshold.set(v.clamp(0.0, 1.0)) } } />
                </label>
                <label>{move || format!("overlay opacity {:.2}", page.opacity.get())}
                    <input id="opacity" type="range" min="0" max="1" step="0.05"
                        prop:value=move || page.opacity.get().to_string()
                        on:input=move |ev| { if let Ok(v) = event_target_value(&ev).parse::<f32>() { page.opacity.set(v.clamp(0.0, 1.0)) } } />
                </label>
                <button id="share" on:click=move |_| page.share() disabled=move || page.image.get().is_none()>"Copy share link"</button>
            </div>
            {move || page.share_link.get().map(|link| view! {
                <input id="share-link" type="text" readonly prop:value=link />
            })}
            {move || (page.run.get() == RunState::Running).then(|| view! {
                <p class="status">{move || format!("Working: {}…", page.worker_status.get())}</p>
            })}
            <canvas node_ref=view_canvas id="view" class="view"></canvas>
            {move || page.results.get().map(|run| {
                let n = run.results.len();
                view! {
                    <p class="status" id="timing" data-encode-ms=run.encode_ms data-decode-ms=run.decode_ms data-prompts=n>
                        {format!("{}: image encoded in {:.0} ms, {n} prompts decoded in {:.0} ms ({:.0} ms per prompt)",
                            run.backend.label(), run.encode_ms, run.decode_ms, run.decode_ms / n.max(1) as f64)}
                    </p>
                }
            })}
            <div class="cards">
                {move || page.results.get().map(|run| {
                    (0..run.results.len()).map(|i| view! { <MaskCard page=page run=run.clone() index=i summaries=summaries /> }).collect_view()
                })}
            </div>
        </section>
    }
}

#[component]
fn MaskCard(
    page: Page,
    run: Arc<RunResults>,
    index: usize,
    summaries: Memo<Option<Vec<MaskSummary>>>,
) -> impl IntoView {
    let canvas = NodeRef::<leptos::html::Canvas>::new();
    let result = run.results[index].clone();
    let (tw, th) = logic::fit(run.width, run.height, logic::THUMB_SIDE);
    {
        let logits = result.logits.clone();
        Effect::new(move |_| {
            let threshold = page.threshold.get();
            if let Some(c) = canvas.get() {
                draw(
                    &c,
                    tw,
                    th,
                    &logic::mask_rgba(&logits.mask_at(threshold, tw, th)),
                );
            }
        });
    }
    let summary = move || summaries.with(|s| s.as_ref().and_then(|s| s.get(index).cloned()));
    let stem = logic::download_stem(index, &result.prompt);
    let (width, height) = (run.width, run.height);
    let for_mask = result.clone();
    let for_logits = result.logits.clone();
    let mask_name = format!("{stem}.mask.png");
    let logits_name = format!("{stem}.logits.npy");
    let color = logic::prompt_color(index);
    view! {
        <figure class="card" class:selected=move || page.selected.get() == index
            data-index=index data-fingerprint=move || summary().map(|s| s.fingerprint).unwrap_or_default()
            on:click=move |_| page.selected.set(index)>
            <canvas node_ref=canvas class="thumb"
                style=format!("border-color: rgb({},{},{})", color[0], color[1], color[2])></canvas>
            <figcaption>
                <q class="prompt-text">{if result.prompt.is_empty() { "(empty prompt)".to_string() } else { result.prompt.clone() }}</q>
                {result.truncated.then(|| view! { <span class="warn">" (cut at 77 tokens)"</span> })}
                <br/>
                <code class="fingerprint" title="sha256 of the binary mask at the image's size (first 16 hex digits)">
                    {move || summary().map(|s| s.fingerprint).unwrap_or_default()}
                </code>
                {move || summary().and_then(|s| s.agreement).map(|a| view! {
                    <br/><span class="agreement" data-agreement=logic::agreement_kind(&a)
                        title="compared with the mask the opened link recorded">{a.to_string()}</span>
                })}
                <br/>
                <span class="fraction">{move || summary().map(|s| format!("{:.1} % foreground", 100.0 * s.fraction)).unwrap_or_default()}</span>
                {move || summary().and_then(|s| s.dice.zip(s.iou)).map(|(d, j)| view! {
                    <br/><span class="score" data-dice=d data-iou=j>{format!("Dice {:.2} % · IoU {:.2} %", 100.0 * d, 100.0 * j)}</span>
                })}
                <br/>
                <button class="link" on:click=move |ev| {
                    ev.stop_propagation();
                    let mask = for_mask.logits.mask_at(page.threshold.get_untracked(), width, height);
                    match vlsm::render::mask_png(&mask, width, height) {
                        Ok(png) => download(&mask_name, "image/png", &png),
                        Err(e) => page.fail(e.to_string()),
                    }
                }>"mask.png"</button>
                " "
                <button class="link" on:click=move |ev| {
                    ev.stop_propagation();
                    match vlsm::render::npy_f32(&[for_logits.size, for_logits.size], &for_logits.values) {
                        Ok(npy) => download(&logits_name, "application/octet-stream", &npy),
                        Err(e) => page.fail(e.to_string()),
                    }
                }>"logits.npy"</button>
            </figcaption>
        </figure>
    }
}
